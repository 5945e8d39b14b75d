"""The phases of the training evidence, each written to disk and skipped when already done.

::

    data     stdlib corpus -> out/data/{source,target,validation}       (byte tokens, memory-mapped)
    source   train a Qwen3-MoE with its learned router + aux loss      -> out/source/model
    distill  Grouter <- the source's first MoE router (detection pass)  -> out/distill
    tune     the Grouter's score layer for balance on target tokens     -> out/tune
    tune_random  a random-init Grouter, tuned the same way (if an arm uses it) -> out/tune_random
    distill_bidir, tune_bidir  the same with a bidirectional Grouter (if an arm uses it)
    targets  a fresh Qwen3-MoE per arm, interleaved, same tokens and init, per seed
                                                                        -> out/targets/result.json
               baseline: learned router + aux loss, torch.compile
               grouter:  apply_grouter(model, GrouterConfig(routing=GrouterRouting(grouter))), or with
                         ``Scale.predispatch`` PrecomputedRouting fed grouter.route(batch) before the step
               others (``arms.ARMS``): z-loss, aux-loss-free, untuned / random / bidirectional Grouter,
               balanced hash;
               the leak test: Grouter arms evaluated with routing from each prefix alone
    report   curves, heatmaps, ratios; every arm's mean ± s.e.           -> CSV, PNG, summary.json/.md

A phase is done when its ``result.json`` exists; it records the settings that produced it, and a
result made with other settings is refused rather than mixed in (``--no-resume`` recomputes).
Training phases also checkpoint every ``save_every`` steps and resume from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grouter_pass import HashRouting
from grouter_pass.router import (
    ByteTokenizer,
    Grouter,
    PackedBatches,
    RouterTeacher,
    TokenizedCorpus,
    distill,
    load_corpus,
    load_grouter,
    load_source_model,
    tune,
)

from . import metrics, plots
from .arms import ARMS, DEFAULT_ARMS, ArmSpec
from .lm import (
    AuxFreeBalancer,
    GrouterHookedLM,
    LMRun,
    build_moe_lm,
    grouter_load,
    grouter_reference_model,
    learned_router_load,
    train_interleaved,
    validation_batches,
)
from .scales import Scale

log = logging.getLogger(__name__)

RESULT = "result.json"
#: every phase a scale may run, in order (``Pipeline.phases`` is a scale's own selection)
ALL_PHASES = ("data", "source", "distill", "tune", "tune_random", "distill_bidir", "tune_bidir", "targets")
#: the phases that make each kind of frozen Grouter, the last one holding it
GROUTER_PHASES = {"tuned": ("distill", "tune"), "raw": ("distill",), "random": ("tune_random",),
                  "bidirectional": ("distill_bidir", "tune_bidir")}
GROUTER_IMPLS = ("pass", "hooks")


class GrouterModeUnavailable(RuntimeError):
    """This checkout's grouter_pass has no Grouter mode (``GrouterRouting``) yet."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run (not what: that is the :class:`Scale`).

    Attributes:
        out_dir: where every phase writes. resume: reuse finished phases and checkpoints.
        progress: progress bars on stderr. device: ``cpu`` or ``cuda``.
        grouter_impl: ``"pass"`` (the graph rewrite, what the evidence is about) or ``"hooks"``
            (a hand-written eager Grouter mode, a fallback; not a throughput measurement).
    """

    out_dir: Path
    resume: bool = True
    progress: bool = True
    device: torch.device = torch.device("cpu")
    grouter_impl: str = "pass"
    command: str = ""


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o)))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True))
    tmp.replace(path)


def compile_grouter_arm(model: torch.nn.Module, grouter: Grouter, compiler: str, *, predispatch: bool = False
                        ) -> tuple[Any, Any]:
    """The Grouter arm through the graph pass: ``(compiled, params_fn)``; with ``predispatch``
    the graph reads routing delivered with each batch (``PrecomputedRouting``) instead of
    running the Grouter inside the step.

    ``params_fn`` is :func:`grouter_pass.trainable_parameters`, asked after the first forward:
    the rewrite has then removed every router linear, and the router weights are left out of
    the optimizer (they would get ``None`` gradients anyway).
    """
    try:
        from grouter_pass import GrouterConfig, GrouterRouting, PrecomputedRouting, apply_grouter, trainable_parameters
    except ImportError as exc:
        raise GrouterModeUnavailable(f"this grouter_pass has no Grouter mode yet ({exc}); run with --grouter-impl "
                                     "hooks for the eager reference, or update the checkout") from None
    source = PrecomputedRouting(num_experts=grouter.config.num_experts, top_k=grouter.config.top_k) if predispatch \
        else GrouterRouting(grouter=grouter)
    compiled = apply_grouter(model, GrouterConfig(routing=source, compiler=compiler))
    return compiled, lambda c, _m: trainable_parameters(c)


def hooked_grouter_arm(model: torch.nn.Module, grouter: Grouter, backend: str) -> tuple[Any, Any]:
    """The Grouter arm as :class:`~.lm.GrouterHookedLM` (no graph pass): ``(callable, params_fn)``."""
    wrapper = GrouterHookedLM(model, grouter)
    routers = wrapper.router_parameters()
    compiled = _compile(wrapper, backend)
    return compiled, lambda _c, m: [p for p in m.parameters() if p not in routers]


class Pipeline:
    """Runs the phases of the module docstring for one :class:`Scale`."""

    def __init__(self, scale: Scale, options: RunOptions) -> None:
        if options.grouter_impl not in GROUTER_IMPLS:
            raise ValueError(f"grouter_impl={options.grouter_impl!r}; choose one of {GROUTER_IMPLS}")
        self.scale, self.opts = scale, options
        self.out = Path(options.out_dir)
        self.device = options.device
        self.vocab_size = ByteTokenizer.vocab_size
        s = dataclasses.asdict(scale)
        data = {k: s[k] for k in ("train_tokens", "validation_tokens")}
        if scale.source_fraction != 0.5:   # only when set: older results stay valid
            data["source_fraction"] = scale.source_fraction
        source = {**data, "model": s["model"], "source_train": s["source_train"], "source_seed": s["source_seed"],
                  "backend": s["baseline_backend"]}
        dist = {**source, "grouter": s["grouter"], "distill": s["distill"]}
        tun = {**dist, "tune": s["tune"]}
        targets = {**tun, "target_train": s["target_train"], "target_seed": s["target_seed"],
                   "grouter_compiler": s["grouter_compiler"], "grouter_impl": options.grouter_impl}
        if scale.target_gate_scale is not None:   # only when set: older results stay valid
            targets["target_gate_scale"] = scale.target_gate_scale
        if scale.predispatch:
            targets["predispatch"] = True
        # what one arm's checkpoint depends on: not on which other arms or seeds run beside it,
        # so adding an arm later keeps the finished ones
        self.arm_settings = dict(targets)
        targets = {**targets, "arms": list(scale.arms), "seeds": list(scale.target_seeds)}
        random_tune = {**tun, "random_grouter_seed": scale.source_seed + 1000}
        dist_bidir = {**dist, "grouter": {**s["grouter"], "causal": False}}
        self.settings = {"data": data, "source": source, "distill": dist, "tune": tun, "tune_random": random_tune,
                         "distill_bidir": dist_bidir, "tune_bidir": {**dist_bidir, "tune": s["tune"]},
                         "targets": targets}
        self.timings: dict[str, float] = {}

    # -------------------------------------------------------------------------------- helpers

    def _done(self, phase: str) -> dict[str, Any] | None:
        path = self.out / phase / RESULT
        if not (self.opts.resume and path.is_file()):
            return None
        result = json.loads(path.read_text())
        saved = result.get("settings", {})
        if phase == "targets" and "target_seed" in saved:   # made before arms and seeds were settings
            saved = {"arms": list(DEFAULT_ARMS), "seeds": [saved["target_seed"]], **saved}
        diff = _settings_diff(saved, _jsonable(self.settings[phase]))
        if diff:
            raise ValueError(f"{path} was made with other settings ({'; '.join(diff)}); use another --out directory "
                             "or --no-resume")
        log.info("phase %s: done earlier, reusing %s", phase, path)
        return result

    def _finish(self, phase: str, result: dict[str, Any], t0: float) -> dict[str, Any]:
        result = {**result, "settings": self.settings[phase], "seconds": time.perf_counter() - t0}
        _write_json(self.out / phase / RESULT, result)
        return _jsonable(result)

    def corpus(self, name: str) -> TokenizedCorpus:
        return TokenizedCorpus.load(self.out / "data" / name)

    def _val_batches(self, batch_size: int, seq_len: int, count: int) -> list[torch.Tensor]:
        return validation_batches(PackedBatches(self.corpus("validation"), seq_len, batch_size, shuffle=False),
                                  count, self.device)

    # --------------------------------------------------------------------------------- phases

    def data(self) -> dict[str, Any]:
        """Tokenize the stdlib corpus; cut the train split in two at a document boundary, the
        source part holding ``source_fraction`` of it."""
        if (done := self._done("data")) is not None:
            return done
        t0 = time.perf_counter()
        sc = self.scale
        train = load_corpus("stdlib", "train", max_tokens=sc.train_tokens)
        val = load_corpus("stdlib", "validation", max_tokens=sc.validation_tokens)
        cut = int(np.searchsorted(train.doc_offsets, round(train.num_tokens * sc.source_fraction)))
        if not 0 < cut < train.num_documents:
            raise ValueError(f"source_fraction={sc.source_fraction} of {train.num_tokens:,} tokens in "
                             f"{train.num_documents} documents leaves one part empty")
        a = int(train.doc_offsets[cut])
        parts = {"source": TokenizedCorpus(train.tokens[:a], train.doc_offsets[:cut + 1], train.vocab_size,
                                           train.tokenizer, f"stdlib train, first {sc.source_fraction:.3g}"),
                 "target": TokenizedCorpus(train.tokens[a:], train.doc_offsets[cut:] - a, train.vocab_size,
                                           train.tokenizer, f"stdlib train, last {1 - sc.source_fraction:.3g}")}
        for name, corpus in (*parts.items(), ("validation", val)):
            corpus.save(self.out / "data" / name)
        result: dict[str, Any] = {name: {"tokens": c.num_tokens, "documents": c.num_documents}
                                  for name, c in (*parts.items(), ("validation", val))}
        # what each side trains on: a budget beyond its part's tokens would re-read them (epochs)
        for name, cfg in (("source", sc.source_train), ("target", sc.target_train)):
            budget = cfg.steps * cfg.tokens_per_step
            result[name]["trained_tokens"] = budget
            if budget > result[name]["tokens"]:
                log.warning("data: the %s trains on %s tokens but its part holds %s: it re-reads them", name,
                            f"{budget:,}", f"{result[name]['tokens']:,}")
        result["source_to_target_tokens"] = result["source"]["trained_tokens"] / result["target"]["trained_tokens"]
        log.info("data: %s", result)
        return self._finish("data", result, t0)

    def source(self) -> dict[str, Any]:
        """Pre-train the source MoE: learned router + aux balance loss."""
        if (done := self._done("source")) is not None:
            return done
        t0 = time.perf_counter()
        sc, cfg = self.scale, self.scale.source_train
        torch._dynamo.reset()
        model = build_moe_lm(sc.model, vocab_size=self.vocab_size, seed=sc.source_seed,
                             aux_loss_coef=cfg.aux_loss_coef, learned_router=True).to(self.device)
        compiled = _compile(model, sc.baseline_backend)
        run = LMRun("source", model, compiled, cfg, self.out / "source", self.settings["source"],
                    params_fn=lambda _c, m: m.parameters(),
                    load_fn=lambda _ids, out: learned_router_load(out, sc.model.top_k, sc.model.num_experts),
                    aux_loss_coef=cfg.aux_loss_coef, device=self.device)
        if self.opts.resume:
            run.try_resume()
        batches = PackedBatches(self.corpus("source"), cfg.seq_len, cfg.batch_size, seed=cfg.data_seed)
        train_interleaved([run], batches, self._val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches),
                          progress=self.opts.progress, desc="source")
        model.save_pretrained(self.out / "source" / "model")
        result = {"final_val_loss": run.curve[-1]["val_loss"], "curve": run.curve,
                  "maxvio_run": metrics.load_summary(run.run_load),
                  "parameters": sum(p.numel() for p in model.parameters())}
        return self._finish("source", result, t0)

    def distill(self) -> dict[str, Any]:
        """Distill a Grouter from the source's first MoE router (found by the detection pass)."""
        return self._distill("distill", self.scale.grouter)

    def distill_bidir(self) -> dict[str, Any]:
        """The same distillation with a bidirectional Grouter (the reference code's default): the
        routing of position t then depends on the tokens after t."""
        return self._distill("distill_bidir", self.scale.grouter.replace(causal=False))

    def tune(self) -> dict[str, Any]:
        """Tune the Grouter's score layer for balance on the target part of the corpus."""
        return self._tune("tune", lambda: load_grouter(self.out / "distill"))

    def tune_bidir(self) -> dict[str, Any]:
        """Tune the bidirectional Grouter like the causal one."""
        return self._tune("tune_bidir", lambda: load_grouter(self.out / "distill_bidir"))

    def tune_random(self) -> dict[str, Any]:
        """A Grouter of the same architecture from a random initialisation, tuned for balance on
        the target part like the distilled one (the ``random_grouter`` arm's router)."""
        def random_grouter() -> Grouter:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings["tune_random"]["random_grouter_seed"])
                return Grouter(self.scale.grouter)

        return self._tune("tune_random", random_grouter)

    def _distill(self, phase: str, config: Any) -> dict[str, Any]:
        if (done := self._done(phase)) is not None:
            return done
        t0 = time.perf_counter()
        torch._dynamo.reset()
        source = load_source_model(self.out / "source" / "model").to(self.device)
        teacher = RouterTeacher(source)
        grouter, ev = distill(teacher, config, self.corpus("source"), self.corpus("validation"),
                              _on_device(self.scale.distill, self.device), out_dir=self.out / phase,
                              resume=self.opts.resume, progress=self.opts.progress)
        result = {"teacher_module": teacher.module_path, "teacher_family": teacher.family,
                  "grouter_parameters": sum(p.numel() for p in grouter.parameters()),
                  "eval": dataclasses.asdict(ev) if ev is not None else None}
        log.info("%s: teacher %s; %s", phase, teacher.module_path, ev)
        return self._finish(phase, result, t0)

    def _tune(self, phase: str, initial: Callable[[], Grouter]) -> dict[str, Any]:
        if (done := self._done(phase)) is not None:
            return done
        t0 = time.perf_counter()
        grouter, res = tune(initial(), self.corpus("target"), self.corpus("validation"),
                            _on_device(self.scale.tune, self.device), out_dir=self.out / phase,
                            resume=self.opts.resume, progress=self.opts.progress)
        result = {"maxvio_raw": res.max_vio_before if res else None, "maxvio_tuned": res.max_vio_after if res else None}
        log.info("%s: %s", phase, res)
        return self._finish(phase, result, t0)

    def _grouter(self, which: str) -> Grouter:
        """The frozen Grouter an arm routes with (a key of ``GROUTER_PHASES``)."""
        where = GROUTER_PHASES[which][-1]
        grouter = load_grouter(self.out / where).to(self.device).eval()
        if self.scale.target_gate_scale is not None:
            grouter.config = grouter.config.replace(scaling_factor=self.scale.target_gate_scale)
        for p in grouter.parameters():
            p.requires_grad_(False)
        return grouter

    def _hash_routing(self) -> HashRouting:
        """A balanced hash table from the token frequencies of the target part."""
        tokens = torch.as_tensor(np.asarray(self.corpus("target").tokens[:4_000_000], dtype=np.int64))
        counts = torch.bincount(tokens, minlength=self.vocab_size)
        return HashRouting.balanced(counts, self.scale.model.num_experts, self.scale.model.top_k)

    def _arm(self, name: str, spec: ArmSpec, seed: int, run_dir: Path, routers: dict[str, Any]
             ) -> tuple[LMRun, torch.nn.Module]:
        """One arm's model (the seed's initialisation), its training callable and its run."""
        sc, cfg = self.scale, self.scale.target_train
        e, k, n_layers = sc.model.num_experts, sc.model.top_k, sc.model.num_layers
        aux = cfg.aux_loss_coef if spec.aux_loss else 0.0
        # transformers records router logits by the router's class: the aux-loss-free router has none
        model = build_moe_lm(sc.model, vocab_size=self.vocab_size, seed=seed, aux_loss_coef=aux,
                             learned_router=spec.learned and not spec.aux_free).to(self.device)
        settings = {**self.arm_settings, "arm": name, "seed": seed}
        if spec.learned:
            balancer = AuxFreeBalancer(model) if spec.aux_free else None
            load_fn = (lambda _ids, _out: balancer.loads()) if balancer is not None else \
                (lambda _ids, out: learned_router_load(out, k, e))
            return LMRun(name, model, _compile(model, sc.baseline_backend), cfg, run_dir, settings,
                         params_fn=lambda _c, m: m.parameters(), load_fn=load_fn, aux_loss_coef=aux,
                         z_loss_coef=spec.z_loss_coef, balancer=balancer, device=self.device), model
        if spec.routing == "hash":
            from grouter_pass import GrouterConfig, apply_grouter, trainable_parameters

            table = routers.setdefault("hash", self._hash_routing())
            compiled = apply_grouter(model, GrouterConfig(routing=table, compiler=sc.grouter_compiler))
            return LMRun(name, model, compiled, cfg, run_dir, settings,
                         params_fn=lambda c, _m: trainable_parameters(c),
                         load_fn=lambda ids, _out: _hash_load(table, ids, n_layers, e), device=self.device), model
        grouter = routers.setdefault(spec.grouter, self._grouter(spec.grouter))
        predispatch = sc.predispatch and self.opts.grouter_impl == "pass"
        if self.opts.grouter_impl == "pass":
            compiled, params = compile_grouter_arm(model, grouter, sc.grouter_compiler, predispatch=predispatch)
        else:
            compiled, params = hooked_grouter_arm(model, grouter, sc.baseline_backend)
        return LMRun(name, model, compiled, cfg, run_dir, settings, params_fn=params,
                     load_fn=lambda ids, _out: grouter_load(grouter, ids, n_layers),
                     routing_fn=grouter.route if predispatch else None, device=self.device), model

    def _val_load(self, spec: ArmSpec, run: LMRun, model: torch.nn.Module, val: list[torch.Tensor]) -> Any:
        """``[L, E]`` expert assignments of a trained arm on the validation batches."""
        sc = self.scale
        with torch.no_grad():
            if run.balancer is not None:   # its selection differs from a top-k of the logits
                run.balancer.start_step()
                model.eval()
                for ids in val:
                    model(input_ids=ids)
                return run.balancer.loads()
            if spec.learned:
                model.eval()
                return sum(learned_router_load(model(input_ids=ids), sc.model.top_k, sc.model.num_experts)
                           for ids in val)
            return sum(run.load_fn(ids, None) for ids in val)

    def targets(self) -> dict[str, Any]:
        """Train the target arms (``Scale.arms``), interleaved on the same batches, once per seed."""
        if (done := self._done("targets")) is not None:
            return done
        t0 = time.perf_counter()
        sc, cfg = self.scale, self.scale.target_train
        self.code_version = code_version()   # at the start: the checkout may change during the run
        routers: dict[str, Any] = {}
        seeds: dict[str, Any] = {}
        val = self._val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        first_extras: dict[str, Any] = {}
        seed_versions: dict[str, str | None] = {}   # a seed finished earlier may have other code
        for i, seed in enumerate(sc.target_seeds):
            done = self._seed_done(i, seed)
            if done is None:
                done = self._train_seed(i, seed, routers, val)
                _write_json(self._seed_path(seed), {**done, "settings": self._seed_settings(i, seed)})
            seeds[str(seed)] = done["arms"]
            seed_versions[str(seed)] = done.get("code_version")
            if i == 0:
                first_extras = done["extras"]
        parity, leak = first_extras["parity"], first_extras["leak_test"]
        router_params, model_params = first_extras["router_parameters"], first_extras["model_parameters"]
        first_seed = seeds[str(sc.target_seeds[0])]
        tuned = routers.get("tuned") or self._grouter("tuned")
        self.grouter_gate = {"causal": tuned.config.causal, "scaling_factor": tuned.config.scaling_factor}
        result = {
            "runs": {name: {k: v for k, v in r.items() if k != "val_load"} for name, r in first_seed.items()
                     if name in DEFAULT_ARMS},
            "val_load": {name: first_seed[name]["val_load"] for name in DEFAULT_ARMS},
            "arms": {name: ARMS[name].label for name in sc.arms}, "seeds": seeds,
            "parity": parity, "leak_test": leak, "router_parameters": router_params,
            "model_parameters": model_params,
            "grouter_impl": self.opts.grouter_impl, "grouter_gate": self.grouter_gate,
            "predispatch": sc.predispatch and self.opts.grouter_impl == "pass",
            "code_version": self.code_version, "command": self.opts.command,
            "seed_code_versions": seed_versions,
        }
        return self._finish("targets", result, t0)

    def _seed_path(self, seed: int) -> Path:
        return self.out / "targets" / f"seed{seed}.json"

    def _seed_settings(self, index: int, seed: int) -> dict[str, Any]:
        return _jsonable({**self.arm_settings, "arms": list(self.scale.arms), "seed": seed, "index": index})

    def _seed_done(self, index: int, seed: int) -> dict[str, Any] | None:
        """A seed finished earlier (each seed is its own resumable step: a machine that ends mid-way
        keeps the seeds it finished, a few MB each, where checkpoints would be tens)."""
        path = self._seed_path(seed)
        if not (self.opts.resume and path.is_file()):
            return None
        done = json.loads(path.read_text())
        if _settings_diff(done.get("settings", {}), self._seed_settings(index, seed)):
            log.info("targets: %s was made with other settings; training seed %d again", path, seed)
            return None
        log.info("targets: seed %d done earlier, reusing %s", seed, path)
        return done

    def _train_seed(self, index: int, seed: int, routers: dict[str, Any], val: list[torch.Tensor]) -> dict[str, Any]:
        """Every arm for one seed, interleaved on the same batches; on the first seed also the
        parity check and the leak test."""
        sc, cfg = self.scale, self.scale.target_train
        torch._dynamo.reset()
        # the first seed keeps the layout of two-arm runs (out/targets/<arm>)
        where = self.out / "targets" if index == 0 else self.out / "targets" / f"seed{seed}"
        arms = {name: self._arm(name, ARMS[name], seed, where / name, routers) for name in sc.arms}
        first = next(iter(arms.values()))[1]
        for _, model in arms.values():
            _check_same_init(first, model)
        runs = [run for run, _ in arms.values()]
        if self.opts.resume:
            for run in runs:
                run.try_resume()
        batches = PackedBatches(self.corpus("target"), cfg.seq_len, cfg.batch_size, seed=cfg.data_seed + index)
        train_interleaved(runs, batches, val, progress=self.opts.progress, desc=f"targets, seed {seed}")
        val_load = {name: self._val_load(ARMS[name], run, model, val) for name, (run, model) in arms.items()}
        for run in runs:   # every optimizer exists now (a run resumed at its last step had none)
            run._ensure_optimizer()
        result: dict[str, Any] = {"arms": {
            name: {"curve": run.curve, "train_log": run.train_log, "step_times": run.step_times,
                   "run_load": run.run_load, "trainable_parameters": run.num_trainable, "val_load": val_load[name]}
            for name, (run, _) in arms.items()}, "extras": None, "code_version": code_version()}
        if index == 0:
            grt, g_model = arms["grouter"]
            result["extras"] = {
                "parity": self._parity(grt, g_model, routers["tuned"], val[0]),
                "leak_test": {name: self._leak_test(model, routers[ARMS[name].grouter], val[: sc.leak_test_batches])
                              for name, (_, model) in arms.items()
                              if ARMS[name].grouter in ("tuned", "bidirectional")},
                "router_parameters": sum(p.numel() for n, p in g_model.named_parameters()
                                         if n.endswith("mlp.gate.weight")),
                "model_parameters": sum(p.numel() for p in arms["baseline"][1].parameters())}
        return _jsonable(result)

    def _leak_test(self, model: torch.nn.Module, grouter: Grouter, batches: list[torch.Tensor]) -> dict[str, Any]:
        """Validation loss of a trained Grouter arm with the routing it trained with, and with the
        routing its Grouter gives each position from the prefix up to it alone. A bidirectional
        Grouter's routing at t reads token t+1 (the label): a target that learned to read the
        label through its routing loses that with prefix routing, and the loss jumps. A causal
        Grouter's two routings are the same (the control)."""
        from .lm import causal_lm_loss

        def mean_loss(router: Any) -> float:
            call = grouter_reference_model(model, router)
            return sum(float(causal_lm_loss(call(ids), ids)) for ids in batches) / len(batches)

        full, prefix = mean_loss(grouter), mean_loss(PrefixRouter(grouter))
        log.info("leak test (%s Grouter): %.4f with its training routing, %.4f with prefix-only routing",
                 "causal" if grouter.config.causal else "bidirectional", full, prefix)
        return {"causal": grouter.config.causal, "training_routing": full, "prefix_routing": prefix,
                "jump": prefix - full, "tokens": sum(b.numel() for b in batches)}

    def _parity(self, run: LMRun, model: torch.nn.Module, grouter: Grouter, ids: torch.Tensor) -> dict[str, float]:
        """Validation loss of the trained Grouter arm through its compiled callable vs the
        hand-written eager reference with the same weights: the rewrite must compute Grouter
        mode, not something close to it."""
        compiled_loss = run.evaluate([ids])
        from .lm import causal_lm_loss

        ref_loss = float(causal_lm_loss(grouter_reference_model(model, grouter)(ids), ids))
        # the same weights routed by the module's own (never trained) router: if the rewrite had
        # silently not happened, the compiled loss would be this one
        with torch.no_grad():
            own_loss = float(causal_lm_loss(model(input_ids=ids).logits, ids))
        log.info("parity: compiled Grouter arm %.6f vs eager reference %.6f (own router: %.6f)", compiled_loss,
                 ref_loss, own_loss)
        return {"compiled": compiled_loss, "reference": ref_loss, "abs_diff": abs(compiled_loss - ref_loss),
                "own_router": own_loss}

    # --------------------------------------------------------------------------------- report

    def report(self, command: str) -> dict[str, Any]:
        """Compute the ratios and write CSV, PNG, ``summary.json`` and ``summary.md``."""
        res = json.loads((self.out / "targets" / RESULT).read_text())
        prior = {p: json.loads((self.out / p / RESULT).read_text()) for p in ("data", "source", "distill", "tune")}
        runs = res["runs"]
        curves = {name: r["curve"] for name, r in runs.items()}
        util = metrics.data_utilisation(curves["baseline"], curves["grouter"])
        med = {name: metrics.median_step_seconds(r["step_times"]) for name, r in runs.items()}
        throughput = med["baseline"] / med["grouter"] if med["baseline"] and med["grouter"] else None
        best = metrics.utilisation_vs_best(curves["baseline"], curves["grouter"])
        half = max(c["tokens"] for c in curves["baseline"]) / 2
        val_load = {n: torch.tensor(v) for n, v in res["val_load"].items()}
        run_load = {n: torch.tensor(r["run_load"]) for n, r in runs.items() if r["run_load"] is not None}
        final = {n: max(c, key=lambda x: x["tokens"])["val_loss"] for n, c in curves.items()}
        title = f"{self.scale.name} scale: Qwen3-MoE {self.scale.model.num_layers}L E={self.scale.model.num_experts} " \
                f"k={self.scale.model.top_k}, stdlib bytes"
        files = {
            "curves_csv": plots.write_curves_csv(self.out / "val_loss.csv", curves),
            "curves_png": plots.plot_curves(self.out / "val_loss.png", curves, target_loss=util.target_loss,
                                            reach_tokens=util.tokens_needed, title=title),
            "train_log_csv": plots.write_train_log_csv(self.out / "train_log.csv",
                                                       {n: r["train_log"] for n, r in runs.items()},
                                                       {n: r["step_times"] for n, r in runs.items()}),
            "expert_load_csv": plots.write_load_csv(self.out / "expert_load.csv", val_load),
            "expert_load_png": plots.plot_heatmaps(self.out / "expert_load.png", val_load,
                                                   title="expert load on validation tokens, final models"),
        }
        arms = None
        if "seeds" in res:   # every arm, every seed
            order = [a for a in self.scale.arms if a in res["arms"]] + [a for a in res["arms"]
                                                                        if a not in self.scale.arms]
            per_arm = {arm: [res["seeds"][seed][arm]["curve"] for seed in res["seeds"]] for arm in order}
            files["arms_csv"] = plots.write_arm_curves_csv(self.out / "val_loss_arms.csv", per_arm)
            files["arms_png"] = plots.plot_arm_bands(self.out / "val_loss_arms.png", per_arm, title=title)
            arms = {"labels": res["arms"], "order": order, "seeds": [int(x) for x in res["seeds"]],
                    "statistics": metrics.arm_statistics(res["seeds"], order)}
        summary = {
            "scale": self.scale.name, "arms": arms, "leak_test": res.get("leak_test"),
            "command": res.get("command") or command, "device": str(self.device),
            "machine": machine_info(self.device), "grouter_impl": res["grouter_impl"],
            "predispatch": res.get("predispatch", False),
            "grouter_gate": res.get("grouter_gate"), "code_version": res.get("code_version"),
            "final_val_loss": final, "equal_data_gap": final["baseline"] - final["grouter"],
            "data_utilisation": {"target_loss": util.target_loss, "baseline_tokens": util.baseline_tokens,
                                 "grouter_tokens_needed": util.tokens_needed, "ratio": util.ratio,
                                 "speedup": util.speedup},
            "data_utilisation_vs_best": best,
            "mean_gap_second_half": metrics.mean_gap(curves["baseline"], curves["grouter"], from_tokens=half),
            "median_step_seconds": med, "throughput_ratio": throughput,
            "grouter_route_ms": self._time_grouter_route(),
            "timed_steps": {n: sum(1 for t in r["step_times"] if t["counted"]) for n, r in runs.items()},
            "maxvio_validation": {n: metrics.load_summary(v) for n, v in val_load.items()},
            "maxvio_run": {n: metrics.load_summary(v) for n, v in run_load.items()},
            "trainable_parameters": {n: r["trainable_parameters"] for n, r in runs.items()},
            "model_parameters": res["model_parameters"], "router_parameters": res["router_parameters"],
            "parity": res["parity"],
            "source": {"final_val_loss": prior["source"]["final_val_loss"], "parameters": prior["source"]["parameters"],
                       "maxvio_run": prior["source"]["maxvio_run"]},
            "distill": {"teacher_module": prior["distill"]["teacher_module"], "eval": prior["distill"]["eval"],
                        "grouter_parameters": prior["distill"]["grouter_parameters"]},
            "tune": {"maxvio_raw": prior["tune"]["maxvio_raw"], "maxvio_tuned": prior["tune"]["maxvio_tuned"]},
            "data": prior["data"],
            "source_to_target_tokens": prior["data"].get("source_to_target_tokens"),
            "phase_seconds": {p: prior[p]["seconds"] for p in prior} | {"targets": res["seconds"]},
            "files": {k: str(v) for k, v in files.items()},
            "settings": _jsonable(self.scale.to_dict()),
        }
        _write_json(self.out / "summary.json", summary)
        if "seeds" in res:
            _write_json(self.out / "results.json", experiment_results(summary, res, prior))
        md = summary_markdown(summary)
        (self.out / "summary.md").write_text(md)
        return summary

    def _time_grouter_route(self, calls: int = 10) -> float:
        """Median ms of one Grouter forward + gate on a training-shaped batch (no grad): what the
        Grouter arm pays per step on top of the model, outside the interleaved timing."""
        import statistics

        grouter = load_grouter(self.out / "tune").to(self.device).eval()
        cfg = self.scale.target_train
        ids = PackedBatches(self.corpus("validation"), cfg.seq_len, cfg.batch_size, shuffle=False).batch(0)
        ids = ids.to(self.device)
        times = []
        with torch.no_grad():
            for i in range(calls + 2):
                t = time.perf_counter()
                grouter.route(ids)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def phases(self) -> list[str]:
        """The training phases this scale's arms need, in order (the report follows them)."""
        needed = {"data", "source", "distill", "tune", "targets"}
        for arm in self.scale.arms:
            needed.update(GROUTER_PHASES.get(ARMS[arm].grouter, ()))
        return [p for p in ALL_PHASES if p in needed]

    def run_all(self, command: str) -> dict[str, Any]:
        for phase in self.phases():
            t = time.perf_counter()
            getattr(self, phase)()
            self.timings[phase] = time.perf_counter() - t
        return self.report(command)


class PrefixRouter:
    """What a Grouter routes position t to when it sees only ``tokens[: t + 1]``: one Grouter
    forward per prefix (an evaluation, not a training path). For a causal Grouter this is its
    ordinary routing."""

    def __init__(self, grouter: Grouter) -> None:
        self.grouter, self.config = grouter, grouter.config

    def route_flat(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = input_ids.shape
        k = self.config.top_k
        weights = torch.empty(b, s, k, dtype=torch.float32, device=input_ids.device)
        ids = torch.empty(b, s, k, dtype=torch.int64, device=input_ids.device)
        with torch.no_grad():
            for t in range(s):
                w, i = self.grouter.route(input_ids[:, : t + 1])
                weights[:, t], ids[:, t] = w[:, t], i[:, t]
        return weights.reshape(-1, k), ids.reshape(-1, k)


def _hash_load(table: HashRouting, input_ids: torch.Tensor, num_layers: int, num_experts: int) -> torch.Tensor:
    """``[L, E]`` assignments when ``table`` routes every one of ``num_layers`` layers."""
    ids = table.compute(input_ids.cpu())[1]
    return torch.bincount(ids.reshape(-1), minlength=num_experts).expand(num_layers, -1).clone()


def _on_device(config: Any, device: torch.device) -> Any:
    """``config`` with ``device`` set, for router configs that have the field."""
    if any(f.name == "device" for f in dataclasses.fields(config)):
        return dataclasses.replace(config, device=device.type)
    return config


def _settings_diff(saved: Any, now: Any, path: str = "") -> list[str]:
    """Settings that differ between a saved result and this run, as ``"path: saved -> now"``.

    A key present on one side only is not a difference: it is a setting that a newer (or older)
    grouter_pass added with its default, and refusing every old result for it would force
    recomputing phases that nothing changed. Where the settings run (``device``) is ignored.
    """
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) & set(now)):
            if k != "device":
                out += _settings_diff(saved[k], now[k], f"{path}.{k}" if path else k)
        return out
    return [] if saved == now else [f"{path}: {saved!r} -> {now!r}"]


def _compile(model: torch.nn.Module, backend: str) -> Any:
    """``torch.compile(model, backend=backend)``, or the eager module for ``backend="none"``."""
    return model if backend == "none" else torch.compile(model, backend=backend)


def _check_same_init(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The target arms must start from the same weights (same seed, same architecture); an arm's
    own buffers (an aux-loss-free router's selection bias) are not weights."""
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    if sa.keys() != sb.keys() or any(not torch.equal(sa[n], sb[n]) for n in sa):
        raise RuntimeError("the two target arms do not start from the same initialisation")


def code_version() -> str | None:
    """``git`` HEAD of the grouter_pass that is imported, ``+dirty`` when its grouter_pass/ or
    passes/ have uncommitted changes (the measured speed and numerics are those of that code). An
    exported tree outside a checkout can name its commit in a ``GIT_COMMIT`` file."""
    import grouter_pass

    root = Path(grouter_pass.__file__).resolve().parents[1]
    if (root / "GIT_COMMIT").is_file():
        return f"{(root / 'GIT_COMMIT').read_text().strip()} (exported to {root})"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "grouter_pass", "passes"], capture_output=True,
                               text=True, cwd=root, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                           platform.processor())
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value: float | None, spec: str = ".4f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def experiment_results(summary: dict[str, Any], res: dict[str, Any], prior: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable record of a multi-arm run (``results.json``; ``docs/results/paper_cpu.json``
    is this file of the ``paper-cpu`` run): per arm and seed the validation curve, final and best
    loss, tokens trained and median step time; the per-arm statistics over seeds; the token
    budgets of source and target; the leak test's two losses; the code version of every seed."""
    runs: dict[str, dict[str, Any]] = {}
    for seed, arms in res["seeds"].items():
        for arm, run in arms.items():
            curve = [{"step": c.get("step"), "tokens": c["tokens"], "val_loss": c["val_loss"]} for c in run["curve"]]
            last = max(curve, key=lambda c: c["tokens"])
            runs.setdefault(arm, {})[seed] = {
                "curve": curve, "final_val_loss": last["val_loss"], "best_val_loss": min(c["val_loss"] for c in curve),
                "tokens": last["tokens"], "median_step_seconds": metrics.median_step_seconds(run["step_times"]),
                "timed_steps": sum(1 for t in run["step_times"] if t["counted"])}
    data = prior["data"]
    return {
        "scale": summary["scale"], "code_version": summary["code_version"],
        "seed_code_versions": res.get("seed_code_versions"), "command": summary["command"],
        "machine": summary["machine"], "predispatch": summary["predispatch"],
        "source_tokens": data["source"]["trained_tokens"], "target_tokens": data["target"]["trained_tokens"],
        "source_to_target_tokens": data.get("source_to_target_tokens"),
        "validation_tokens": data["validation"]["tokens"],
        "arms": res["arms"], "seeds": [int(x) for x in res["seeds"]],
        "runs": runs, "statistics": summary["arms"]["statistics"] if summary.get("arms") else None,
        "leak_test": {arm: {k: v[k] for k in ("causal", "training_routing", "prefix_routing", "jump", "tokens")}
                      for arm, v in (res.get("leak_test") or {}).items()},
        "source": summary["source"], "distill": summary["distill"], "tune": summary["tune"],
    }


def summary_markdown(s: dict[str, Any]) -> str:
    """The end-of-run summary (also the table pasted into docs/results.md)."""
    u, b = s["data_utilisation"], s["data_utilisation_vs_best"]
    if u["ratio"] is None:
        util = (f"not reached: the Grouter run never got to the baseline's final validation loss "
                f"{u['target_loss']:.4f} within {u['baseline_tokens']:,} tokens")
    else:
        util = (f"{u['ratio']:.1%} of the baseline's tokens ({u['grouter_tokens_needed']:,.0f} of "
                f"{u['baseline_tokens']:,}), i.e. {u['speedup']:.2f}x")
    med = s["median_step_seconds"]
    mv, mr = s["maxvio_validation"], s["maxvio_run"]
    par = s["parity"]
    rows = [
        ("final validation loss (nats/byte)", _fmt(s["final_val_loss"]["baseline"]),
         _fmt(s["final_val_loss"]["grouter"])),
        ("median step time (s)", _fmt(med["baseline"], ".3f"), _fmt(med["grouter"], ".3f")),
        ("timed steps", str(s["timed_steps"]["baseline"]), str(s["timed_steps"]["grouter"])),
        ("MaxVio, validation, mean over layers", _fmt((mv["baseline"] or {}).get("mean"), ".3f"),
         _fmt((mv["grouter"] or {}).get("mean"), ".3f")),
        ("MaxVio, validation, worst layer", _fmt((mv["baseline"] or {}).get("max"), ".3f"),
         _fmt((mv["grouter"] or {}).get("max"), ".3f")),
        ("MaxVio over the whole run, mean over layers", _fmt((mr.get("baseline") or {}).get("mean"), ".3f"),
         _fmt((mr.get("grouter") or {}).get("mean"), ".3f")),
        ("trainable parameters", f"{s['trainable_parameters']['baseline']:,}",
         f"{s['trainable_parameters']['grouter']:,}"),
    ]
    lines = [
        f"## Grouter training evidence: `{s['scale']}` scale",
        "",
        f"Command: `{s['command']}`  ",
        f"Code: grouter-pass {s.get('code_version') or 'unknown'} (at the start of the target runs)  ",
        f"Machine: {s['machine'].get('cpu')}, {s['machine']['threads']} threads, torch {s['machine']['torch']}, "
        f"device {s['device']}; Grouter arm: {s['grouter_impl']}"
        + (", routing pre-dispatched (computed before each timed step)" if s.get("predispatch") else "")
        + (f", {'causal' if s['grouter_gate']['causal'] else 'bidirectional'} Grouter, gates sum to "
           f"{s['grouter_gate']['scaling_factor']:g}" if s.get("grouter_gate") else ""),
        "",
        "| | baseline (learned router + aux loss) | Grouter (frozen, all layers) |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"- **Data utilisation**: {util} (paper: 23.3%, 4.28x).",
        f"- **Equal-data loss gap** (baseline - Grouter): {s['equal_data_gap']:+.4f} at the end, "
        f"{_fmt(s['mean_gap_second_half'], '+.4f')} on average over the second half's evaluations.",
        f"- Against the baseline's *best* validation loss {b['target_loss']:.4f} (reached after "
        f"{b['baseline_tokens']:,.0f} tokens), the Grouter run needed "
        + (f"{b['grouter_tokens_needed']:,.0f} tokens ({b['ratio']:.1%})." if b["ratio"] is not None else
           "more tokens than it had (not reached)."),
        f"- **Training-step throughput ratio** (median step baseline / Grouter): "
        f"{_fmt(s['throughput_ratio'], '.3f')}; one Grouter forward on a training batch alone takes "
        f"{s['grouter_route_ms']:.1f} ms.",
        f"- Source model: final validation loss {_fmt(s['source']['final_val_loss'])}, trained on "
        f"{_fmt(s.get('source_to_target_tokens'), '.1f')}x the target's tokens; distilled from "
        f"`{s['distill']['teacher_module']}`: {_fmt((s['distill']['eval'] or {}).get('kl'))} KL, top-k overlap "
        f"{_fmt((s['distill']['eval'] or {}).get('topk_overlap'), '.1%')}; tuning MaxVio "
        f"{_fmt(s['tune']['maxvio_raw'], '.3f')} (raw) -> {_fmt(s['tune']['maxvio_tuned'], '.3f')} (tuned).",
        f"- Parity of the compiled Grouter arm with a hand-written eager reference (validation loss): "
        f"|diff| = {par['abs_diff']:.2e}.",
        "",
    ]
    if s.get("arms"):
        lines += arms_markdown(s["arms"])
    if s.get("leak_test"):
        lines += leak_markdown(s["leak_test"])
    return "\n".join(lines)


def leak_markdown(leak: dict[str, Any]) -> list[str]:
    """The leak test: each Grouter arm's validation loss with its training routing and with
    routing computed from each position's prefix alone (first seed)."""
    lines = ["### Leak test: routing from the prefix alone (first seed)", "",
             "| arm | Grouter | with its training routing | with prefix-only routing | jump | tokens |",
             "|---|---|---|---|---|---|"]
    for arm, t in leak.items():
        lines.append(f"| {arm} | {'causal' if t['causal'] else 'bidirectional'} | {t['training_routing']:.4f} | "
                     f"{t['prefix_routing']:.4f} | {t['jump']:+.4f} | {t['tokens']:,} |")
    return [*lines, "", "A bidirectional Grouter routes position t with token t+1 (the label) in view; a jump "
            "means the target learned to read it through its routing. A causal Grouter shows none by "
            "construction.", ""]


def _mean_se(stat: dict[str, Any], spec: str) -> str:
    if stat["mean"] is None:
        return "not reached" if stat["missing"] else "n/a"
    text = format(stat["mean"], spec) + (f" ± {format(stat['se'], spec)}" if stat["se"] is not None else "")
    return text + (f" ({stat['missing']} of {stat['n'] + stat['missing']} not reached)" if stat["missing"] else "")


def arms_markdown(arms: dict[str, Any]) -> list[str]:
    """Every arm over every seed: mean ± standard error, each arm against its seed's baseline."""
    seeds = arms["seeds"]
    lines = [f"### Every arm, {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}): "
             "mean ± standard error", "",
             "| arm | final validation loss | equal-data gap (baseline - arm) | data utilisation (tokens to the "
             "baseline's final loss, fraction) | step-time ratio (baseline / arm) | MaxVio, validation |",
             "|---|---|---|---|---|---|"]
    for arm in arms["order"]:
        st = arms["statistics"][arm]
        lines.append(f"| {arm}: {arms['labels'][arm]} | {_mean_se(st['final_val_loss'], '.4f')} | "
                     f"{_mean_se(st['equal_data_gap'], '+.4f')} | {_mean_se(st['data_utilisation_ratio'], '.3f')} | "
                     f"{_mean_se(st['throughput_ratio'], '.3f')} | {_mean_se(st['maxvio_validation'], '.3f')} |")
    return [*lines, ""]
