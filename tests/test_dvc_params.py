"""dvc.yaml lists, per stage, exactly the params keys its script reads, so `dvc exp run -S key=value`
re-runs only the stages downstream of what changed."""

import re

import yaml

from pipeline.params import load_params

# read by every stage through start_stage; they choose where and how fast, not what is computed
EXECUTION_ONLY = {"base.device", "base.threads", "base.num_workers"}
ACCESS = re.compile(r"\bparams\.(\w+)(?:\.(\w+))?")
ALIAS = re.compile(r"^\s*(\w+) = params\.(\w+)\s*$", re.MULTILINE)


def _stages(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def _covered(key: str, listed: list[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in listed)


def test_every_listed_param_exists_and_no_stage_depends_on_the_whole_file(repo_root):
    params = load_params(repo_root / "params.yaml").model_dump()
    for name, stage in _stages(repo_root).items():
        for entry in stage.get("params", []):
            assert isinstance(entry, str), f"{name}: params entry {entry!r} names a file, not keys"
            node = params
            for part in entry.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: {entry} is not a params key"
                node = node[part]


def test_each_stage_lists_every_param_its_script_reads(repo_root):
    for name, stage in _stages(repo_root).items():
        source = (repo_root / "stages" / f"{name}.py").read_text()
        listed = stage.get("params", [])
        read = {f"{a}.{b}" if b else a for a, b in ACCESS.findall(source)}
        for alias, section in ALIAS.findall(source):  # `p = params.step1` then `p.lr`
            read |= {f"{section}.{k}" for k in re.findall(rf"\b{alias}\.(\w+)", source)}
            read.discard(section)
        missing = sorted(k for k in read if k not in EXECUTION_ONLY and not _covered(k, listed))
        assert not missing, f"stage {name} reads {missing} but dvc.yaml does not list them"
