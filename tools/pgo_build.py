"""Profile-guided build of the engine's core (yikatong.engine._core); `make build` runs it after
the plain install.

    .venv/bin/python tools/pgo_build.py            # instrument, train, rebuild with the profile
    .venv/bin/python tools/pgo_build.py --train    # the training run alone (an instrumented core)

Why: gcc with a profile lays the settlement path out straight and keeps the rare answers out of
it, which hand-written hints did not match (bench/README.md, "Profile-guided build"): 539 → 474
instructions per settlement (callgrind) and 0–9 % more settlements per second (CPU time,
interleaved runs) on this machine.

The training is the traffic a node serves, in proportion: medical settlements (就医结算) by
generated cards, most of them posting, some declined for funds, on a transaction table small
enough that the ring evicts; then the rarer answers — repeats (duplicates), reversals (冲正) of
some of them, and the same settlements through the generic path. Fixed seeds: the same sources
give the same profile, so the same binary.

Every failure stops the build with its reason: a build that silently dropped the profile would
be a slower engine nobody asked for.
"""
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent.parent
PGO_DIR = HERE / "build" / "pgo"


def build(stage: str) -> None:
    env = dict(os.environ, YIKATONG_PGO=stage)
    env.pop("YIKATONG_DEBUG", None)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"],
                   cwd=HERE, env=env, check=True, stdout=subprocess.DEVNULL)


def train() -> None:
    import numpy as np

    sys.path.insert(0, str(HERE))
    from bench.bench_engine import build_engine, KEYS, BD, SEED
    from yikatong.engine import Cmd, RESULT_DTYPE
    from yikatong.engine.workload import generated_pan_hashes, medical_settlements

    cards, count, retention = 20_000, 200_000, 1 << 16
    engine = build_engine(cards, retention=retention)
    pan_hashes = generated_pan_hashes(KEYS, cards)
    settlements = medical_settlements(engine, pan_hashes, count, seed=SEED)
    results = np.zeros(count, dtype=RESULT_DTYPE)
    engine.apply_batch(settlements, results, business_date=BD)
    approved = int(np.count_nonzero(results["code"] == 0x3030))   # "00"
    # repeats of the last ones (still retained): the stored answers
    engine.apply_batch(settlements[-2_000:], business_date=BD)
    # reversals of 2,000 retained settlements
    originals = settlements[-4_000:-2_000]
    reversals = originals.copy()
    reversals["cmd"] = Cmd.REVERSAL
    reversals["orig_stan"] = originals["stan"]
    reversals["orig_batch"] = originals["batch_no"]
    reversals["orig_date"] = originals["local_date"]
    reversals["batch_no"] = originals["batch_no"] + 1
    reversals["idem_key"] = originals["idem_key"] ^ np.uint64(0x9E3779B97F4A7C15)
    reversals["content_hash"] = reversals["idem_key"]
    engine.apply_batch(reversals, business_date=BD)
    # the generic path for the same kind of traffic
    engine.core.fast_settle = False
    engine.apply_batch(medical_settlements(engine, pan_hashes, 20_000, seed=SEED + 1,
                                           first_stan=count + 1), business_date=BD)
    if approved < count // 2:
        raise SystemExit(f"pgo training: {approved} of {count} settlements approved, expected most")


def main() -> None:
    if sys.argv[1:] == ["--train"]:
        train()
        return
    shutil.rmtree(PGO_DIR, ignore_errors=True)
    build("generate")
    subprocess.run([sys.executable, __file__, "--train"], cwd=HERE, check=True)
    profiles = list(PGO_DIR.rglob("*.gcda"))
    if not profiles:
        raise SystemExit(f"pgo: the training wrote no profile under {PGO_DIR}; "
                         "remedy: check that gcc supports -fprofile-generate (libgcov)")
    build("use")
    print(f"pgo: yikatong.engine._core rebuilt with the profile of {len(profiles)} file(s) in {PGO_DIR}")


if __name__ == "__main__":
    main()
