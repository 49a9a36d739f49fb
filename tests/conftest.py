"""Shared fixtures: the tests' own tiny Minari datasets, and tiny pretrained checkpoints every script's tests load.

The tests never read a datasets root from outside: at import, MINARI_DATASETS_PATH points at a temporary root that
holds `local/hopper/medium-v0` and `local/door/human-v0`, made here from a few hundred steps of a noisy random policy.
"""

import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATASETS_ROOT = Path(tempfile.mkdtemp(prefix="grpo-dt-tests-datasets-"))
os.environ["MINARI_DATASETS_PATH"] = str(DATASETS_ROOT)
# One torch thread here and in every script a test starts: a killed run and its resumption, in two processes, must
# add up floats in the same order as an uninterrupted run (the scripts themselves leave threads to OMP_NUM_THREADS).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

import pretrain_dt  # noqa: E402

TINY_DATASETS = {  # id: (env id, env key, episodes, step limit)
    "local/hopper/medium-v0": ("Hopper-v4", "hopper", 24, 60),
    "local/door/human-v0": ("AdroitHandDoor-v1", "door", 4, 50),
}


def make_tiny_dataset(dataset_id: str, env_id: str, key: str, episodes: int, max_steps: int, seed: int = 0):
    """`episodes` episodes of clip(0.7 N(0, 1)) actions, so about 15% of action values sit exactly on the bounds, as
    in the real sets; written with `minari.create_dataset_from_buffers`, reference scores as D4RL's."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env, rng, buffers = pretrain_dt.make_env(env_id, max_episode_steps=max_steps), np.random.default_rng(seed), []
    for ep in range(episodes):
        obs, acts, rew, term, trunc = [env.reset(seed=seed + ep)[0]], [], [], [], []
        while not (term and (term[-1] or trunc[-1])):
            acts.append(np.clip(0.7 * rng.standard_normal(env.action_space.shape), -1, 1).astype(np.float32))
            o, r, te, tr, _ = env.step(acts[-1])
            obs.append(o), rew.append(float(r)), term.append(bool(te)), trunc.append(bool(tr))
        episode = dict(observations=np.array(obs), actions=np.array(acts), rewards=rew, terminations=term)
        buffers.append(EpisodeBuffer(**episode, truncations=trunc, infos={}))
    ref_min, ref_max = pretrain_dt.D4RL_REF[key]
    with warnings.catch_warnings():  # minari asks for authors, links and descriptions a test set does not have
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, ref_min_score=ref_min, ref_max_score=ref_max)


for _id, _spec in TINY_DATASETS.items():
    make_tiny_dataset(_id, *_spec)


@pytest.fixture
def own_datasets_root(monkeypatch):
    """Keeps MINARI_DATASETS_PATH on the tests' root for a test that changes it."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(DATASETS_ROOT))
    return DATASETS_ROOT


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
