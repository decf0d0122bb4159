from kvrt.runtime.kv.owners import AgentResidency, BlockOwners

PLANNER = ("run-a", "planner")
CODER = ("run-a", "coder")
OTHER = ("run-b", "planner")


def test_claim_counts_device_and_shared_blocks_per_agent():
    owners = BlockOwners()
    owners.claim(PLANNER, [0, 1, 2])
    owners.claim(CODER, [0, 1, 5])
    owners.claim(OTHER, [2])
    assert owners.residency("run-a") == {
        "planner": AgentResidency(device_blocks=3, shared_blocks=3),  # 0, 1 coder; 2 run-b
        "coder": AgentResidency(device_blocks=3, shared_blocks=2),  # 0, 1 with the planner
    }
    assert owners.residency("run-b") == {"planner": AgentResidency(1, 1)}
    assert owners.residency("run-c") == {}
    assert owners.block_ids() == {0, 1, 2, 5}
    owners.check_integrity()


def test_claiming_a_block_twice_counts_it_once():
    owners = BlockOwners()
    owners.claim(PLANNER, [3])
    owners.claim(PLANNER, [3, 4])
    assert owners.residency("run-a") == {"planner": AgentResidency(2, 0)}
    owners.check_integrity()


def test_drop_block_removes_it_from_every_owner_and_forgets_empty_owners():
    owners = BlockOwners()
    owners.claim(PLANNER, [0, 1])
    owners.claim(OTHER, [1])
    owners.drop_block(1)
    assert owners.residency("run-a") == {"planner": AgentResidency(1, 0)}
    assert owners.residency("run-b") == {}
    owners.drop_block(7)  # a block nobody owns: nothing to do
    owners.drop_block(0)
    assert owners.is_empty()
    owners.check_integrity()


def test_release_run_returns_only_blocks_no_other_owner_holds():
    owners = BlockOwners()
    owners.claim(PLANNER, [4, 0, 1])
    owners.claim(CODER, [1, 2])
    owners.claim(OTHER, [2, 3])
    assert owners.release_run("run-a") == [0, 1, 4]  # 2 is still run-b's
    assert owners.residency("run-a") == {}
    assert owners.residency("run-b") == {"planner": AgentResidency(2, 0)}
    assert owners.block_ids() == {2, 3}
    assert owners.release_run("run-a") == []
    assert owners.release_run("run-b") == [2, 3]
    assert owners.is_empty()
    owners.check_integrity()

