"""kvrt.runtime.sim: the engine's scheduler, KV manager and policies over a GPU cost model.

- hardware.py: named devices (h100, a100, cpu-calibrated) and their efficiency factors
- engine_profiles.py: whose engine a GPU's step times describe (vllm-class, kvrt): host costs
- model_shapes.py: model shapes without weights; parameter counts, KV bytes per token
- cost_model.py: a roofline step-time model, one engine step -> seconds; row and host-link copies
- measure.py: the real engine's step times over a grid of batches
- calibrate.py: the cost model's coefficients fitted to those times (`cpu-calibrated`)
- measure_host.py: kvrt's own per-step host work and kernel launches, for the kvrt profile
- executor.py: SimExecutor (an Executor that prices a step instead of running it, and the KV's
  row operations, priced) and SimClock
- words.py: the tokens it samples: whole words that re-tokenize to themselves when quoted
- link.py: SimLink, the host tier's Mover on a simulated host link
- engine.py: build_sim_engine, the real engine assembly over a SimExecutor and a SimLink
- driver.py: SimDriver, which steps the engine on the virtual-time loop (virtual_loop.py)
"""
