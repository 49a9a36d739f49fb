"""Shared fixtures: the shared datasets root, and tiny pretrained checkpoints every script's tests load."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MINARI_DATASETS_PATH", str((ROOT / ".." / "shared" / "datasets").resolve()))

import pretrain_dt  # noqa: E402

TINY_MODEL = dict(embed_dim=32, n_layers=1, n_heads=2)


def tiny_pretrain_args(path: Path, env_id: str, dataset: str, **overrides) -> pretrain_dt.Args:
    """pretrain_dt.py's flags at toy size, writing the checkpoint to `path`; any field can be overridden."""
    base = dict(
        env_id=env_id,
        dataset=dataset,
        checkpoint=str(path),
        num_updates=20,
        batch_size=16,
        eval_every=0,
        eval_episodes=1,
        save_every=0,
        warmup_updates=5,
        runs_dir=str(path.parent / "runs"),
        **TINY_MODEL,
    )
    return pretrain_dt.Args(**{**base, **overrides})


def make_tiny_checkpoint(path: Path, env_id: str, dataset: str, **overrides) -> Path:
    """A real pretrain_dt.py run at toy size: what the finetuning scripts' tests start from."""
    pretrain_dt.main(tiny_pretrain_args(path, env_id, dataset, **overrides))
    return path


@pytest.fixture(scope="session")
def hopper_checkpoint(tmp_path_factory) -> Path:
    """Tiny DT pretrained on local/hopper/medium-v0 (Hopper-v4), context 20."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "hopper.pt", "Hopper-v4", "local/hopper/medium-v0")


@pytest.fixture(scope="session")
def door_checkpoint(tmp_path_factory) -> Path:
    """Tiny DT pretrained on local/door/human-v0 (AdroitHandDoor-v1), context 5."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "door.pt", "AdroitHandDoor-v1", "local/door/human-v0")


def check_checkpoint_loads(load_model, path: Path):
    """The loader contract every script's tests reuse.

    `load_model(path) -> (model, ckpt)` is the script's own loader. The script's own copy of the DT must take
    the saved state dict strictly, and give the same actions as pretrain_dt's model on the same inputs.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["format_version"] == pretrain_dt.CHECKPOINT_FORMAT_VERSION
    theirs, _ = load_model(path)
    cfg = {k: v for k, v in ckpt["model_config"].items() if k not in ("activation", "c_offline")}
    ours = pretrain_dt.DecisionTransformer(**cfg)
    ours.load_state_dict(ckpt["state_dict"])
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(0)
    T, S, A = ckpt["model_config"]["c_offline"], cfg["state_dim"], cfg["act_dim"]
    rtg, states, actions = (
        torch.randn(3, T, 1, generator=g),
        torch.randn(3, T, S, generator=g),
        torch.randn(3, T, A, generator=g),
    )
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[0, : T // 2] = False
    device = next(theirs.parameters()).device
    with torch.no_grad():
        m1, s1 = ours(rtg, states, actions, mask)
        m2, s2 = theirs(*(x.to(device) for x in (rtg, states, actions, mask)))
    torch.testing.assert_close(m1, m2.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2.cpu(), rtol=1e-5, atol=1e-5)
    return ckpt
