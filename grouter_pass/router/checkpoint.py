"""Save and load Grouters: safetensors + JSON config (+ folding mapping), and the reference layout.

A checkpoint is a directory::

    config.json          GrouterModelConfig.to_dict()
    model.safetensors    native parameter names (network.py), float tensors
    folding.json         optional: {"source_experts": E_S, "groups": [[source ids of target 0], ...]}
    expanding.json       optional: {"source_experts": E_S, "new_experts": [...]}

:func:`load_grouter` also reads the published reference checkpoints (``grouter.pth`` and
friends, method notes section 11.3): their keys carry the wrapper prefixes
``grouter_structure.model.`` / ``grouter_structure.score.score`` and a doubled
``embed_tokens.embed_tokens``; :func:`convert_reference_state_dict` strips them and
:func:`infer_config` reads the sizes from the shapes.

Every file is checked before use, and a problem is reported with the values involved: a
truncated or corrupt safetensors file, a non-float tensor, a shape that disagrees with the
config, a missing or unexpected key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grouter_pass.router.config import GrouterModelConfig
from grouter_pass.router.network import Grouter

log = logging.getLogger(__name__)

#: safetensors metadata key of the tokenizer fingerprint (``data.tokenizer_fingerprint``)
TOKENIZER_KEY = "tokenizer"
CONFIG_FILE, WEIGHTS_FILE, FOLDING_FILE, EXPANDING_FILE = "config.json", "model.safetensors", "folding.json", \
    "expanding.json"
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_REF_PREFIX = "grouter_structure."


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit its config."""


@dataclass
class Folding:
    """Which source experts each target expert absorbed: ``groups[t]`` lists the source ids."""

    source_experts: int
    groups: list[list[int]]

    @property
    def target_experts(self) -> int:
        return len(self.groups)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The binary group map ``M [E_S, E_T]`` (method notes Eq. 5: ``W_folded = W M``)."""
        m = torch.zeros(self.source_experts, self.target_experts, dtype=dtype)
        for t, group in enumerate(self.groups):
            m[group, t] = 1
        return m

    def validate(self) -> None:
        flat = sorted(i for g in self.groups for i in g)
        if flat != list(range(self.source_experts)):
            raise CheckpointError(f"folding mapping must use each of the {self.source_experts} source experts exactly "
                                  f"once; it lists {len(flat)} ids: {flat}")

    def to_dict(self) -> dict[str, Any]:
        return {"source_experts": self.source_experts, "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Folding:
        f = cls(int(d["source_experts"]), [[int(i) for i in g] for g in d["groups"]])
        f.validate()
        return f


def expected_shapes(config: GrouterModelConfig) -> dict[str, tuple[int, ...]]:
    """Native parameter name -> shape for ``config``."""
    d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for proj in "qkvo":
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (d, d)
        shapes[f"{p}mlp.gate_proj.weight"] = (f, d)
        shapes[f"{p}mlp.up_proj.weight"] = (f, d)
        shapes[f"{p}mlp.down_proj.weight"] = (d, f)
        shapes[f"{p}input_layernorm.weight"] = (d,)
        shapes[f"{p}post_attention_layernorm.weight"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["score.weight"] = (e, d)
    shapes["bias"] = (e,)
    return shapes


def check_state_dict(state_dict: dict[str, torch.Tensor], config: GrouterModelConfig, *, source: str) -> None:
    """Raise :class:`CheckpointError` naming the first key whose presence, dtype or shape is wrong."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{source}: state dict does not match the config: missing keys {missing[:6]}"
                              f"{'...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
                              f"{'...' if len(unexpected) > 6 else ''}")
    for name, shape in want.items():
        t = state_dict[name]
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {t.dtype}; a Grouter needs floating-point "
                                  "weights (float32, bfloat16 or float16)")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(t.shape)} but the config "
                                  f"(vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                                  f"intermediate_size={config.intermediate_size}, num_experts={config.num_experts}) "
                                  f"needs {list(shape)}")


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header against the file size, so a truncated download is
    reported as such (safetensors itself may only say "invalid header" or read garbage)."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file: {size} bytes, the header length "
                              "alone needs 8")
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header declares {n} bytes "
                                  f"but the file has {size - 8} after the length field")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data_len = size - 8 - n
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data_len:
        raise CheckpointError(f"{path} is truncated: its header says the tensor data is {end} bytes but the file "
                              f"holds {data_len}")
    for name, v in header.items():
        if name != "__metadata__" and v.get("dtype") not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {v.get('dtype')}; a Grouter needs floating-point "
                                  f"weights ({', '.join(_FLOAT_DTYPES)})")
    return header


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file written by :func:`save_grouter` ({} if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt: safetensors cannot read it ({exc})") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it is complete and float-only.

    The header is checked first for the common failures (a truncated download, not a safetensors
    file at all), with messages that say so; whatever else safetensors itself finds wrong (offsets
    that do not match a tensor's shape, overlapping tensors, an unknown dtype) is reported as a
    :class:`CheckpointError` naming the file, not as a bare ``SafetensorError``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Grouter weights not found: {path}")
    _read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt: safetensors cannot read it ({exc})") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object, found {type(data).__name__}")
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part
    (the temporary name holds the process id: shards of one run may write the same file)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(value, indent=2).encode())


def save_grouter(grouter: Grouter, path: str | os.PathLike, *, folding: Folding | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``grouter`` to the directory ``path`` (created if needed); returns the path.

    ``folding`` defaults to ``grouter.folding`` when :func:`~grouter_pass.router.fold.fold_grouter`
    set it. ``extra`` is stored as safetensors string metadata (e.g. the distillation step), and so
    is ``grouter.tokenizer_fingerprint`` (``"tokenizer"``) when known.
    """
    from safetensors.torch import save

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in grouter.state_dict().items()}
    extra = dict(extra or {})
    if getattr(grouter, "tokenizer_fingerprint", None):
        extra.setdefault(TOKENIZER_KEY, grouter.tokenizer_fingerprint)
    meta = {k: str(v) for k, v in extra.items()}
    write_atomic(out / WEIGHTS_FILE, save(state, metadata=meta or None))
    write_atomic(out / CONFIG_FILE, grouter.config.to_json().encode())
    folding = folding if folding is not None else getattr(grouter, "folding", None)
    if folding is not None:
        write_atomic(out / FOLDING_FILE, json.dumps(folding.to_dict()).encode())
    elif (out / FOLDING_FILE).exists():
        (out / FOLDING_FILE).unlink()
    expanding = getattr(grouter, "expanding", None)
    if expanding is not None:
        write_atomic(out / EXPANDING_FILE, json.dumps(expanding).encode())
    elif (out / EXPANDING_FILE).exists():
        (out / EXPANDING_FILE).unlink()
    log.debug("saved Grouter to %s", out)
    return out


def load_grouter(path: str | os.PathLike, *, config: GrouterModelConfig | None = None,
                 dtype: torch.dtype | None = None, **overrides: Any) -> Grouter:
    """Load a Grouter from a checkpoint directory, a ``.safetensors`` file, or a reference ``.pth``.

    Args:
        path: a directory written by :func:`save_grouter`; a ``.safetensors`` file (with the
            ``config.json`` beside it, if any); or a ``.pth``/``.pt`` state dict in the reference
            release's layout. A lone weights file's sizes are inferred from its shapes
            (:func:`infer_config`) unless ``config`` is given.
        config: overrides the stored config (needed for settings shapes cannot tell, e.g. the
            number of heads of a reference checkpoint whose head dim is not 64).
        dtype: cast the loaded weights (default: as stored).
        overrides: config fields to change after loading, e.g. ``top_k=6`` for the reference's
            folded 64-expert checkpoint (a reference ``.pth`` does not record k; it defaults to
            ``min(8, E)``) or ``scaling_factor=1.0``. Shape fields are checked like the rest.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Grouter checkpoint not found: {p}")
    folding, expanding, tokenizer = None, None, None
    if p.is_dir() or p.suffix == ".safetensors":
        directory = p if p.is_dir() else p.parent
        weights = p / WEIGHTS_FILE if p.is_dir() else p
        # a directory must carry its config; a lone weights file without one gets sizes from shapes
        infer = config is None and not p.is_dir() and not (directory / CONFIG_FILE).exists()
        if config is None and not infer:
            try:
                config = GrouterModelConfig.from_dict(_read_json(directory / CONFIG_FILE, "Grouter config"))
            except TypeError as exc:
                raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
        state = read_safetensors(weights)
        if state.keys() and all(k.startswith(_REF_PREFIX) or k == "bias" for k in state):
            state = convert_reference_state_dict(state)
        if infer:
            config = infer_config(state)
        if (directory / FOLDING_FILE).exists():
            try:
                folding = Folding.from_dict(_read_json(directory / FOLDING_FILE, "folding mapping"))
            except (KeyError, TypeError) as exc:
                raise CheckpointError(f"{directory / FOLDING_FILE} is corrupt: missing field {exc}") from None
            if folding.target_experts != config.num_experts:
                raise CheckpointError(f"{directory / FOLDING_FILE} maps onto {folding.target_experts} experts but the "
                                      f"config has num_experts={config.num_experts}")
        if (directory / EXPANDING_FILE).exists():
            expanding = _read_json(directory / EXPANDING_FILE, "expanding record")
        tokenizer = read_safetensors_metadata(weights).get(TOKENIZER_KEY)
        source = str(weights)
    elif p.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged zip/pickle
            raise CheckpointError(f"{p} is corrupt or truncated: torch.load failed ({type(exc).__name__}: {exc})") \
                from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{p} does not hold a state dict (found {type(state).__name__})")
        state = convert_reference_state_dict(state)
        config = config or infer_config(state)
        source = str(p)
    else:
        raise CheckpointError(f"{p}: unknown checkpoint format (expected a directory, .safetensors or .pth)")
    if overrides:
        try:
            config = config.replace(**overrides)
        except TypeError as exc:
            raise ValueError(f"load_grouter: {exc}") from None
    grouter = build_grouter(state, config, source=source)
    grouter.folding, grouter.expanding = folding, expanding
    grouter.tokenizer_fingerprint = tokenizer
    if dtype is not None:
        grouter.to(dtype)
    return grouter


def build_grouter(state: dict[str, torch.Tensor], config: GrouterModelConfig, *, source: str = "state dict"
                  ) -> Grouter:
    """A :class:`Grouter` with ``state`` (native names) loaded, after :func:`check_state_dict`."""
    check_state_dict(state, config, source=source)
    with torch.device("meta"):
        grouter = Grouter(config)
    grouter = grouter.to_empty(device="cpu")
    grouter.rotary.__init__(config.head_dim, config.rope_theta)  # non-persistent buffer: rebuild on CPU
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) == 1:
        grouter.to(dtypes.pop())
    grouter.load_state_dict(state, strict=True)
    return grouter.eval()


_REF_RULES = [
    (re.compile(r"^grouter_structure\.model\.embed_tokens\.embed_tokens\.weight$"), "embed_tokens.weight"),
    (re.compile(r"^grouter_structure\.model\.embed_tokens\.weight$"), "embed_tokens.weight"),
    # only the mha structure's layer keys: another structure's (mla's kv_a_proj_with_mqa, ...) is listed
    (re.compile(r"^grouter_structure\.model\.(layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj|"
                r"input_layernorm|post_attention_layernorm)\.weight)$"), r"\1"),
    (re.compile(r"^grouter_structure\.model\.norm\.weight$"), "norm.weight"),
    (re.compile(r"^grouter_structure\.score\.score\.weight$"), "score.weight"),
    (re.compile(r"^grouter_structure\.score\.weight$"), "score.weight"),
    (re.compile(r"^bias$"), "bias"),
]


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the reference release's keys (method notes section 11.3) onto native names.

    Keys already in the native layout pass through; anything else is an error that lists it
    (a state dict of another structure type, e.g. ``mla``, is not this network).
    """
    native_like = set(expected_shapes_names(state))
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state dict entry {key} is a {type(value).__name__}, not a tensor")
        for pattern, repl in _REF_RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            if key in native_like:
                out[key] = value
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"state dict has keys that are not in the Grouter (mha) layout: {sorted(unknown)[:8]}")
    if "bias" not in out and "score.weight" in out:
        out["bias"] = torch.zeros(out["score.weight"].shape[0], dtype=out["score.weight"].dtype)
    return out


def expected_shapes_names(state: dict[str, Any]) -> list[str]:
    """Keys of ``state`` that already have native names."""
    pat = re.compile(r"^(embed_tokens\.weight|norm\.weight|score\.weight|bias|layers\.\d+\..+\.weight)$")
    return [k for k in state if pat.match(k)]


def infer_config(state: dict[str, torch.Tensor], *, head_dim: int = 64, **overrides: Any) -> GrouterModelConfig:
    """Sizes of a native-named state dict read off its shapes. The number of heads cannot be read
    from shapes: it is ``hidden_size // head_dim`` with the release's head dim of 64 (or 1 head
    for widths below 64); RoPE base, eps and the gate scale are the reference defaults."""
    for key in ("embed_tokens.weight", "score.weight"):
        if key not in state:
            raise CheckpointError(f"cannot infer the Grouter config: state dict has no {key}")
    vocab, d = state["embed_tokens.weight"].shape
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^layers\.(\d+)\.", k))})
    inter = state["layers.0.mlp.gate_proj.weight"].shape[0] if layers else 4 * d
    e = state["score.weight"].shape[0]
    heads = max(1, d // head_dim) if d % head_dim == 0 else 1
    kw = dict(vocab_size=int(vocab), hidden_size=int(d), num_layers=len(layers), intermediate_size=int(inter),
              num_experts=int(e), top_k=min(8, int(e)), num_heads=heads)
    kw.update(overrides)
    return GrouterModelConfig(**kw)


def grouter_fingerprint(grouter: Grouter) -> str:
    """A short hash of a Grouter's config and parameters: stored with pre-dispatched routing (and
    with tuning checkpoints) so a cache cannot be paired with another Grouter by mistake."""
    h = hashlib.sha256(grouter.config.to_json().encode())
    for name, t in sorted(grouter.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
