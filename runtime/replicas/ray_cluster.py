"""`kvrt serve --replicas N` / `--ray-address ADDR`: Ray joined or started, N RayReplicas built
behind one ReplicaSet.

    --replicas N            a local Ray instance, N replicas (one GPU each when there are
                            GPUs and the engine may use them, else one CPU each, torch's
                            threads split among them)
    --ray-address ADDR      join that cluster: one replica per GPU in it (one on a CPU if it
                            has none), unless --replicas says how many

The front daemon never loads the weights: the model's facts (name, context, tokenizer,
vocabulary) come from the checkpoint's config and tokenizer (runtime/model/facts.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kvrt.runtime.config import ConfigError, ServeConfig
from kvrt.runtime.engine.assembly import context_length
from kvrt.runtime.model.facts import read_model_facts
from kvrt.runtime.replicas.ray_replica import RayReplica
from kvrt.runtime.replicas.replica_set import ReplicaSet
from kvrt.runtime.replicas.router import make_router

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'kvrt[ray]'"


def uses_ray(config: ServeConfig) -> bool:
    """One replica and no cluster: the in-process engine, as without replicas."""
    return config.ray_address is not None or (config.replicas or 1) > 1


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--replicas and --ray-address need Ray: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True, slots=True)
class Placement:
    replicas: int
    resources: dict[str, float]  # each actor's
    threads: int | None  # torch's threads in each CPU actor (None: Ray's OMP_NUM_THREADS)


def plan_placement(config: ServeConfig, cluster: dict[str, Any], local: bool) -> Placement:
    """How many replicas, with what each. `cluster`: ray.cluster_resources()."""
    gpus = int(cluster.get("GPU", 0))
    on_gpu = gpus > 0 and config.engine.device in ("auto", "cuda")
    if config.engine.device == "cuda" and not gpus:
        raise ConfigError("--device cuda was asked for, but the Ray cluster has no GPU")
    replicas = config.replicas or (gpus if on_gpu and not local else 1)
    if on_gpu:
        if replicas > gpus:
            message = f"{replicas} replicas need {replicas} GPUs; the Ray cluster has {gpus}"
            if local:
                raise ConfigError(message)
            log.warning("%s: the rest wait for GPUs to join", message)
        return Placement(replicas, {"num_gpus": 1}, None)
    threads = max(1, (os.cpu_count() or 1) // replicas) if local else None
    return Placement(replicas, {"num_cpus": 1}, threads)


class RayCluster:
    """Ray, joined or started for the daemon's life; `close()` disconnects (and stops the local
    instance, which ends the replicas)."""

    def __init__(self, config: ServeConfig) -> None:
        ray = self._ray = import_ray()
        self.local = config.ray_address is None
        if self.local:
            cpus = max(os.cpu_count() or 1, config.replicas or 1)  # every CPU replica fits
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=config.ray_address, logging_level=logging.WARNING)
        try:
            self.placement = plan_placement(config, ray.cluster_resources(), self.local)
        except BaseException:
            ray.shutdown()
            raise

    def replica_set(self, config: ServeConfig) -> ReplicaSet:
        """The replicas (not started: the app starts them) behind one ReplicaSet."""
        facts = read_model_facts(config.engine.model)
        name = config.served_model_name or facts.name
        max_model_len = context_length(config.engine, facts.config.max_position)
        placement = self.placement
        replicas = [RayReplica(str(i), config.engine, model_name=name,
                               max_model_len=max_model_len, tokenizer=facts.tokenizer,
                               vocab_size=facts.config.vocab_size,
                               resources=placement.resources, threads=placement.threads,
                               log_level=config.log_level)
                    for i in range(placement.replicas)]
        log.info("%d engine replicas on Ray (%s each%s), router %s", placement.replicas,
                 ", ".join(f"{k}={v}" for k, v in placement.resources.items()),
                 f", {placement.threads} torch threads" if placement.threads else "",
                 config.router)
        router = make_router(config.router, placement.replicas,
                             step_tokens=config.engine.max_num_batched_tokens)
        return ReplicaSet(replicas, router, model_name=name, max_model_len=max_model_len,
                          tokenizer=facts.tokenizer, vocab_size=facts.config.vocab_size)

    def close(self) -> None:
        self._ray.shutdown()
