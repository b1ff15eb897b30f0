"""An animation of one greedy episode (needs pygame for gymnasium's rgb_array rendering)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class RenderUnavailable(RuntimeError):
    pass


def record_gif(policy, env_id: str, path: str | Path, seed: int = 0, fps: int = 30) -> dict:
    """``policy``: a NumpyQPolicy or a torch module returning Q (as for :func:`.evaluate.evaluate`)."""
    import gymnasium as gym

    from .evaluate import greedy_actions

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # its greeting would precede --json's line
    try:
        import pygame  # noqa: F401
    except ImportError:
        raise RenderUnavailable("--gif needs pygame: pip install 'apexq[render]'") from None
    from PIL import Image

    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    total, done = 0.0, False
    act = greedy_actions(policy)
    while not done:
        a = int(act(np.asarray(obs, np.float32)[None])[0])
        obs, r, term, trunc, _ = env.step(a)
        total += float(r)
        done = term or trunc
        frames.append(env.render())
    env.close()
    images = [Image.fromarray(np.asarray(f)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, optimize=True)
    return {"frames": len(frames), "return": total, "path": str(path)}
