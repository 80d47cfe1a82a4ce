#!/usr/bin/env python
"""Run a set of ablation configs one after another and tabulate ours beside the paper's.

    python tools/sweep.py --configs 'configs/Ablations/table1a_*.yaml' \
        --budget configs/Ablations/budgets/shapes_cpu.yaml --output-dir output/sweep_shapes
    python tools/sweep.py --configs 'configs/Ablations/table1b_*.yaml' --num-gpus 8 \
        --output-dir output/sweep_coco                       # the paper's setting, on COCO

Each config runs ``train_net.py`` in ``OUTPUT_DIR/<config name>/`` with ``--resume``: a run
that finished (``result.json`` there) is skipped, an interrupted one continues from its
last checkpoint. A budget file (optional) is merged over each config, then the config's
own keys are applied again, so the budget sets model size, data, image size and schedule
while the ablation keeps what it studies. Trailing ``KEY VALUE`` pairs are applied last.
Writes ``results.csv`` and ``results.md``: our AP, AP50, AP75, APs, APm, APl and inference
time per image, with the paper's numbers (``configs/Ablations/paper_results.csv``) beside.
"""
import argparse
import csv
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.config import CfgNode  # noqa: E402

from retina_focal.config.load import load_config  # noqa: E402

PAPER_RESULTS = os.path.join(REPO, "configs", "Ablations", "paper_results.csv")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PAPER_COLUMNS = METRICS + ("time_ms",)
_INFERENCE_TIME = re.compile(r"Total inference pure compute time: \S+ \(([0-9.]+) s / iter per device")


def own_keys(path: str) -> CfgNode:
    """The keys a config file sets itself (without those of its ``_BASE_`` chain)."""
    with open(path) as f:
        own = yaml.unsafe_load(f) or {}  # ablation files compute anchor sizes with !!python
    own.pop("_BASE_", None)
    return CfgNode(own)


def sweep_config(path: str, budget: Optional[str] = None, opts: List[str] = ()) -> CfgNode:
    """``path``'s config with ``budget`` merged over it, ``path``'s own keys again, then ``opts``."""
    cfg = load_config(path)
    if budget:
        cfg.merge_from_file(budget)
        cfg.merge_from_other_cfg(own_keys(path))
    cfg.merge_from_list(list(opts))
    return cfg


def read_result(out_dir: str) -> Dict[str, float]:
    """Final COCO metrics (metrics.json) and inference seconds per image (log.txt)."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    final = [r for r in rows if "bbox/AP" in r][-1]
    result = {m: final[f"bbox/{m}"] for m in METRICS}
    with open(os.path.join(out_dir, "log.txt")) as f:
        times = _INFERENCE_TIME.findall(f.read())
    result["time_ms"] = 1000 * float(times[-1]) if times else float("nan")
    return result


def run_one(path: str, out_dir: str, budget: Optional[str], opts: List[str], num_gpus: int) -> Dict[str, float]:
    """Train and evaluate one config (or reuse its finished result)."""
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        print(f"[sweep] {os.path.basename(path)}: finished before, skipped")
        with open(done) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    config_file = os.path.join(out_dir, "sweep_config.yaml")
    with open(config_file, "w") as f:
        f.write(sweep_config(path, budget, opts).dump())
    print(f"[sweep] {os.path.basename(path)}: training in {out_dir}", flush=True)
    command = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file,
               "--num-gpus", str(num_gpus), "--resume", "OUTPUT_DIR", out_dir]
    with open(os.path.join(out_dir, "sweep.log"), "a") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} failed (exit {proc.returncode}); see {out_dir}/sweep.log")
    result = read_result(out_dir)
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def load_paper_results() -> Dict[str, Dict[str, str]]:
    with open(PAPER_RESULTS) as f:
        return {row["config"]: row for row in csv.DictReader(f)}


def write_tables(results: Dict[str, Dict[str, float]], out_dir: str, note: str) -> None:
    """results.csv and results.md: our metrics beside the paper's, one row per config."""
    paper = load_paper_results()
    refs = {name: paper.get(name, {}) for name in results}
    # the paper's columns that any of these rows has (APs/m/l and time: Table 1e only)
    columns = [m for m in PAPER_COLUMNS if any(ref.get(m) for ref in refs.values())]
    header = ["config", "table", "row"] + [f"ours {m}" for m in PAPER_COLUMNS] + [f"paper {m}" for m in columns]
    rows = []
    for name, ours in results.items():
        ref = refs[name]
        rows.append([name, ref.get("table", ""), ref.get("row", "")]
                    + [f"{ours[m]:.1f}" for m in PAPER_COLUMNS] + [ref.get(m, "") for m in columns])
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    lines = [note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="config files or globs")
    parser.add_argument("--budget", help="config merged over each ablation (e.g. budgets/shapes_cpu.yaml)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per run (train_net.py --num-gpus)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides applied last")
    args = parser.parse_args(argv)
    paths = sorted({p for pattern in args.configs for p in glob.glob(pattern)})
    if not paths:
        parser.error(f"--configs {args.configs} matches no file")
    results = {}
    for path in paths:
        name = os.path.basename(path)
        results[name] = run_one(path, os.path.join(args.output_dir, os.path.splitext(name)[0]), args.budget,
                                args.opts, args.num_gpus)
    command = "python tools/sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_tables(results, args.output_dir, f"Made by `{command}`.")
    print(f"[sweep] {len(results)} result(s) in {args.output_dir}/results.md")


if __name__ == "__main__":
    main()
