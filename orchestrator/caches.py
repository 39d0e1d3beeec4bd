"""Work done once in a study's driver before its trials need it, and a thread to do it in.

:func:`prepare_caches` builds the cache entries each trial would otherwise build at its start on its one core
while the others wait (the dequantized SmolLM2 and its tokenizer, the tiny preset's tokenizer, tailored scores);
:class:`Background` runs such work in a daemon thread while Ray starts.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from trainables.config import ModelConfig

from .progress import Progress


class Background:
    """``fn()`` running in a daemon thread; :meth:`result` waits for it and re-raises its error."""

    def __init__(self, fn: Callable, name: str):
        import threading

        self._box: dict = {}

        def run():
            try:
                self._box["value"] = fn()
            except BaseException as e:  # re-raised where the result is used
                self._box["error"] = e

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]

    def error(self) -> Optional[BaseException]:
        self._thread.join()
        return self._box.get("error")


def prepare_caches(configs: list, meta_cfg: Optional[dict] = None, threads: Optional[int] = None) -> list[str]:
    """Build in this process (a study's driver, on this machine), before the trials need them, the cache entries
    each trial would otherwise build at its start on its one core while the others wait: the dequantized SmolLM2
    and its tokenizer (on two cores: trainables.models.build_smollm2_caches), the tiny preset's tokenizer, and
    the tailored scores of a model with neither a cache entry nor a shipped score file (scored here with
    ``threads`` torch threads; the shipped ones seed the cache in the trial, which has the model at hand).
    ``configs``: the trials' run configs. Returns what was done, in words (nothing when every entry exists)."""
    import torch

    from trainables.models import build_smollm2_caches, smollm2_tokenizer_dir
    from trainables.tailor import scores_cache_path, shipped_scores_file

    done: list[str] = []
    models = [c.model for c in configs]
    if meta_cfg is not None:
        models.append(ModelConfig.model_validate(meta_cfg.get("model", {})))
        phi_model = (meta_cfg.get("phi") or {}).get("model")
        if phi_model:
            models.append(ModelConfig.model_validate(phi_model))
    names = {m.name for m in models}
    if "smollm2-135m" in names:
        done += [f"SmolLM2 {what}" for what in build_smollm2_caches()]
    elif "tiny" in names:
        from trainables.models import cache_dir

        if not (cache_dir() / "tokenizers" / "smollm2" / ".complete").exists():
            smollm2_tokenizer_dir()
            done.append("SmolLM2 tokenizer")
    seen, lamas = set(), {}
    for c in configs:
        if getattr(c, "temporalwiki", None) is not None or c.data.split != "tailored":
            continue
        from trainables.data import load_lama

        if c.data.dir not in lamas:  # the trials of a grid share their data: read and hashed once
            lamas[c.data.dir] = load_lama(c.data.dir)
        lama = lamas[c.data.dir]
        key = (scores_cache_path(c.model, lama, c.data.task), c.device)
        if key in seen:
            continue
        seen.add(key)
        if key[0].is_file() or shipped_scores_file(c.model, lama, c.data.task) is not None:
            continue
        from trainables.tailor import cached_scores
        from trainables.theta import build_theta, resolve_device

        before, n = torch.get_num_threads(), max(1, threads or os.cpu_count() or 1)
        torch.set_num_threads(n)
        try:
            device = resolve_device(c.device)
            theta = build_theta(c.model, None, device, c.seed)  # the base model: what tailoring scores
            cached_scores(c.model, lama, c.data.task, lambda: theta.model, theta.tokenizer, c.eval.batch_size, device)
            del theta
        finally:
            torch.set_num_threads(before)
        done.append(f"tailored scores of {c.model.name} ({c.data.task}, {n} threads)")
    return done


def start_preparing(configs: list, meta_cfg: Optional[dict], cpus: Optional[int]) -> Optional[Background]:
    """:func:`prepare_caches` in a thread, for a study on this machine (``cpus``: its Ray instance's CPUs; None:
    a cluster, whose nodes build their own). A failure there is only logged: the trials meet it as before."""
    if cpus is None:
        return None

    def run() -> list[str]:
        import logging

        try:
            return prepare_caches(configs, meta_cfg, cpus)
        except Exception as e:  # an optimisation only: the trial that needs the entry builds it, or fails, as before
            logging.getLogger("ray").warning("preparing the caches in the driver failed (%s: %s); the trials "
                                             "build what they need", type(e).__name__, e)
            return []

    return Background(run, "taalm-prepare-caches")


def note_prepared(prep: Optional[Background], progress: Progress) -> None:
    """Wait for :func:`start_preparing`'s work; say what it built."""
    done = prep.result() if prep is not None else []
    if done:
        progress.note("built once, before the trials: " + ", ".join(done))
