"""grpo_dt_fast.py's env step (`FastEnvs.step`: batched MuJoCo v4 physics and formulas where supported, and through
worker processes) against plain gymnasium `env.step`, side by side from the same states, through terminations, resets
and the time limit."""

import mujoco
import numpy as np
import pytest

import grpo_dt
import grpo_dt_fast

FAMILIES = ["Hopper-v4", "Walker2d-v4", "Ant-v4", "HalfCheetah-v4", "AdroitHandDoor-v1", "AntMaze_UMaze-v4"]


@pytest.mark.parametrize("env_id", FAMILIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_matches_gymnasium(env_id, dtype):
    """3 members of `Envs` and 3 plain gymnasium envs, reset with the same seeds, take the same actions for 120 steps
    (time limit 30, so every member is truncated several times; a terminated or truncated pair is reset together
    with a fresh seed). Observations, rewards, terminations, truncations agree to 1e-9 and MjData bit for bit."""
    n, limit = 3, 30
    envs = grpo_dt_fast.FastEnvs(grpo_dt.Args(env_id=env_id, max_episode_steps=limit), n)
    plain = [grpo_dt.make_env(env_id, max_episode_steps=limit) for _ in range(n)]
    assert (envs.fast is not None) == grpo_dt_fast.MujocoStep.supports(env_id)
    rng, seeds = np.random.default_rng(0), iter(range(10, 1000))
    idx = np.arange(n)
    start = [next(seeds) for _ in range(n)]
    envs.reset(idx, start)
    for e, s in zip(plain, start):
        e.reset(seed=s)
    A = plain[0].action_space.shape[0]
    sim = [(e.unwrapped.model, e.unwrapped.data) for e in plain]
    size = mujoco.mj_stateSize(sim[0][0], mujoco.mjtState.mjSTATE_FULLPHYSICS)
    ends = {"terminated": 0, "truncated": 0}
    for t in range(120):
        live = idx[rng.random(n) < 0.8]  # some members sit a step out, as finished members do in a rollout
        scale = 1.0 if t % 2 else 0.3  # big actions make Hopper/Walker2d fall: terminations
        actions = (scale * rng.uniform(-1, 1, (len(live), A))).astype(dtype)
        obs, rew, term, trunc = envs.step(live, actions)
        for j, i in enumerate(live):
            o, r, te, tr = plain[i].step(actions[j])[:4]
            assert np.abs(obs[j] - o).max() <= 1e-9 and abs(rew[j] - r) <= 1e-9, (t, i)
            assert (bool(term[j]), bool(trunc[j])) == (te, tr), (t, i)
            ours, theirs = envs.sims[i].data, sim[i][1]
            a, b = np.empty(size), np.empty(size)
            mujoco.mj_getState(sim[i][0], ours, a, mujoco.mjtState.mjSTATE_FULLPHYSICS)
            mujoco.mj_getState(sim[i][0], theirs, b, mujoco.mjtState.mjSTATE_FULLPHYSICS)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ours.xipos, theirs.xipos)
            if te or tr:
                ends["terminated" if te else "truncated"] += 1
                s = next(seeds)
                envs.reset([i], [s])
                plain[i].reset(seed=s)
    assert ends["truncated"] >= 1
    if env_id.split("-")[0] in ("Hopper", "Walker2d"):
        assert ends["terminated"] >= 1


def test_fast_step_survives_reset_to_state():
    """A member restored into a recorded state (mid-episode, TimeLimit counter included) steps like gymnasium."""
    envs = grpo_dt_fast.FastEnvs(grpo_dt.Args(env_id="Hopper-v4", max_episode_steps=12), 2)
    plain = grpo_dt.make_env("Hopper-v4", max_episode_steps=12)
    _, params = envs.reset([0, 1], [3, 4])
    plain.reset(seed=3)
    rng = np.random.default_rng(1)
    acts = rng.uniform(-0.2, 0.2, (20, 3)).astype(np.float32)
    for a in acts[:5]:
        envs.step([0], a[None])
        plain.step(a)
    prev = envs.get_states([0])[0][0]
    envs.step([0], acts[5][None])
    plain.step(acts[5])
    state, elapsed = envs.get_states([0])
    envs.restore([1], [(params[0], prev, state[0], elapsed[0])])
    for a in acts[6:12]:
        o1, r1, te1, tr1 = envs.step([1], a[None])
        o2, r2, te2, tr2 = plain.step(a)[:4]
        assert np.abs(o1[0] - o2).max() <= 1e-9 and abs(r1[0] - r2) <= 1e-9 and (te1[0], tr1[0]) == (te2, tr2)
    assert tr1[0] or te1[0]  # the time limit came back with the state


@pytest.mark.parametrize("env_id", ["Hopper-v4", "AntMaze_UMaze-v4"])
def test_worker_pool_shared_memory_steps_like_in_process(env_id):
    """EnvPool with 2 workers (actions and results through shared arrays) gives what in-process `FastEnvs` gives."""
    n, rng = 5, np.random.default_rng(2)
    local, pool = (
        grpo_dt_fast.EnvPool(grpo_dt_fast.Args(env_id=env_id, max_episode_steps=15, num_workers=w), n) for w in (0, 2)
    )
    try:
        for envs in (local, pool):
            envs.reset(np.arange(n), np.arange(n) + 7)
        A = local.local.envs[0].action_space.shape[0]
        for t in range(20):  # past the time limit of 15: truncations come back through shared memory too
            live = np.flatnonzero(rng.random(n) < 0.7)[::-1]  # any order, both workers or one
            actions = rng.uniform(-1, 1, (len(live), A)).astype(np.float32 if t % 2 else np.float64)
            for a, b in zip(local.step(live, actions), pool.step(live, actions)):
                np.testing.assert_array_equal(a, b)
    finally:
        local.close()
        pool.close()
