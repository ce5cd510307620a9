"""Train a Differential Transformer.

    python train.py                                   # configs/tiny.py on the embedded corpus
    python train.py --config=configs/paper_830m.py    # a paper size
    python train.py --config=configs/tiny.py:standard --config.total_steps=100 --config.model.num_layers=2
    python train.py --config=configs/paper_830m.py --print_config   # every key, its value and meaning; exits

On CPU the run uses one XLA device per core, as many as the mesh and batch allow (`JAX_NUM_CPU_DEVICES` or
`XLA_FLAGS=--xla_force_host_platform_device_count=N` choose another count).

Bad input (unknown key, wrong type, invalid value) ends with one `train.py: error: ...` line and exit code 2.
"""

from pathlib import Path

from absl import flags

from diffjax.cli import UsageError, run_main

_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved, validated config (every key, its value and meaning) and exit."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    config = flags.FLAGS.config
    if _PRINT_CONFIG.value:
        from diffjax.config import describe, validate

        validate(config)
        print(describe(config))
        return
    if config.aot_topology:
        from diffjax.train.aot import compile_for_topology, describe

        print(describe(compile_for_topology(config)))
        return
    from diffjax.parallel.mesh import use_cpu_cores
    from diffjax.train.loop import run

    use_cpu_cores(config.mesh.shape, config.batch_size // config.grad_accum_steps)
    run(config)


if __name__ == "__main__":
    run_main("train.py", main, default_config=Path(__file__).parent / "configs" / "tiny.py")
