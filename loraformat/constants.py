"""The one vocabulary of loraformat: every key, kind, format name, finding code and rule name, declared once.

Modelled on gguf-py's ``constants.py``: code elsewhere imports names from here and never re-declares a string
that means the same thing. The enums derive from ``str`` so a member equals its spelling (``LayerKind.LINEAR ==
"linear"``), serialises to JSON as that spelling and can be compared with values read from files. Adding a
kind, format, layout or finding code means adding it here (and, for a finding code, to spec/v1.md §15 — a test
keeps the two equal). This module imports nothing from the package, so anything may import it.
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A str-valued enum whose ``str()`` and ``format()`` are the value on every Python version."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# --- spec version (spec/v1.md §13) ------------------------------------------------------------------------

SPEC_VERSION = "1.1"  # 1.1: base_model.quantization (spec/v1.md §8 Base quantization)
SPEC_MAJOR, SPEC_MINOR = (int(p) for p in SPEC_VERSION.split("."))

# --- metadata keys (spec/v1.md §1, §3) --------------------------------------------------------------------

#: the ``__metadata__`` key whose value is the loraformat JSON document
METADATA_KEY = "loraformat"
#: transformers and PEFT require this in ``__metadata__``
FORMAT_KEY, FORMAT_VALUE = "format", "pt"

#: ModelSpec 1.0.1 keys written beside ours so ecosystem tools recognise the file
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_ARCH_SUFFIX = "/lora"


class ModelSpecKey(StrEnum):
    """The ``modelspec.*`` keys of ``__metadata__`` (spec/v1.md §3)."""

    SAI_MODEL_SPEC = "modelspec.sai_model_spec"
    ARCHITECTURE = "modelspec.architecture"
    IMPLEMENTATION = "modelspec.implementation"
    TITLE = "modelspec.title"
    DESCRIPTION = "modelspec.description"
    DATE = "modelspec.date"
    HASH_SHA256 = "modelspec.hash_sha256"


#: the key ``loraformat merge`` writes into every output shard's ``__metadata__``: the adapters and weights merged
#: (JSON), which ``unmerge`` checks its adapters against
MERGE_RECORD_KEY = "loraformat.merge"

#: tensor key prefix PEFT uses; keeping it makes the file load unchanged in PEFT and vLLM
PEFT_PREFIX = "base_model.model."
#: the files of a PEFT adapter directory: its config, its weights, and the pickled weights of older versions
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"

#: identifies the base-model hashing scheme of spec/v1.md §9
HASH_ALGORITHM = "loraformat-tensor-sha256/1"

# --- layer kinds and rules (spec/v1.md §5, §6, §12) -------------------------------------------------------


class LayerKind(StrEnum):
    """What one term adds to: the module kinds of the metadata table, plus ``BIAS`` (a ``lora_bias`` term,
    s·lora_B.bias added to the base bias), which only ever appears in a merge plan."""

    LINEAR = "linear"
    EMBEDDING = "embedding"
    CONV = "conv"
    BIAS = "bias"


#: the kinds a module of the metadata table may have (schemas/adapter-v1.schema.json ``kind``)
MODULE_KINDS = (LayerKind.LINEAR, LayerKind.EMBEDDING, LayerKind.CONV)


class ScalingRule(StrEnum):
    """spec/v1.md §5: s = alpha/r, or alpha/sqrt(r) for rsLoRA."""

    STANDARD = "alpha/r"
    RSLORA = "alpha/sqrt(r)"


#: PEFT's bias modes (spec/v1.md §4)
BIAS_MODES = ("none", "all", "lora_only")

# --- formats and layouts ----------------------------------------------------------------------------------


class Format(StrEnum):
    """Adapter formats loraformat reads (``Adapter.source_format``) and writes (``convert --to``)."""

    LORAFORMAT = "loraformat"
    PEFT = "peft"
    PEFT_PICKLE = "peft-pickle"  # adapter_model.bin, read only with allow_pickle
    KOHYA = "kohya"  # sd-scripts LoRA files (spec/interop/kohya.md)
    DIFFUSERS = "diffusers"  # pytorch_lora_weights.safetensors (spec/interop/diffusers.md)
    GGUF = "gguf"  # a llama.cpp LoRA adapter (spec/interop/llamacpp.md), written by convert --for llama.cpp


#: formats ``convert --to`` writes
CONVERT_TARGETS = (Format.LORAFORMAT, Format.PEFT, Format.KOHYA, Format.DIFFUSERS, Format.GGUF)


class Engine(StrEnum):
    """Inference engines ``convert --for`` / ``validate --for`` / ``push --for`` target (loraformat/engines/)."""

    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    PEFT = "peft"


#: the layout each engine reads
ENGINE_LAYOUT = {Engine.VLLM: Format.PEFT, Engine.LLAMA_CPP: Format.GGUF, Engine.PEFT: Format.PEFT}

# --- diffusion pipelines, kohya and diffusers files (spec/interop/kohya.md, spec/interop/diffusers.md) -----

#: diffusers pipeline sub-folders that LoRA adapters target (module paths are qualified by them)
PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
#: a diffusers pipeline directory's index file
MODEL_INDEX = "model_index.json"
#: kohya key prefix -> diffusers component (lora_unet_ is the denoiser: unet, or transformer when the base
#: has no unet)
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
#: kohya training metadata keys start with this; kept across conversions
KOHYA_TRAINING_PREFIX = "ss_"
#: sd-scripts' hashes of the tensor data, recomputed on every kohya write, never copied
KOHYA_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
#: provenance.details key that keeps a converted kohya file's ss_* metadata
KOHYA_DETAILS_KEY = "kohya_metadata"
#: ss_* training metadata -> what it means, in the order inspect shows it
KOHYA_PLAIN_WORDS = {
    "ss_output_name": "name",
    "ss_base_model_version": "base model",
    "ss_sd_model_name": "trained on checkpoint",
    "ss_new_sd_model_hash": "checkpoint sha256",
    "ss_sd_model_hash": "checkpoint legacy hash",
    "ss_network_module": "network module",
    "ss_network_dim": "rank (network dim)",
    "ss_network_alpha": "alpha (network alpha)",
    "ss_network_args": "network arguments",
    "ss_training_started_at": "training started (unix time)",
    "ss_training_finished_at": "training finished (unix time)",
    "ss_num_train_images": "training images",
    "ss_num_epochs": "epochs",
    "ss_max_train_steps": "steps",
    "ss_learning_rate": "learning rate",
    "ss_unet_lr": "unet learning rate",
    "ss_text_encoder_lr": "text encoder learning rate",
    "ss_optimizer": "optimizer",
    "ss_resolution": "resolution",
    "ss_mixed_precision": "mixed precision",
    "ss_seed": "seed",
    "ss_clip_skip": "clip skip",
}
#: diffusers' __metadata__ key holding each component's LoraConfig, and its LoRA weights file name
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


class StoredLayout(StrEnum):
    """How a base tensor's values are stored; a merge kernel's codec decodes one layout to fp32 and encodes
    back to it (loraformat/ops/codec.py). Quantized layouts add their names here."""

    DENSE = "dense"  # a plain floating-point tensor (any dtype in io/header.py FLOAT_DTYPES)
    FP8 = "fp8"  # F8_E4M3 with tensor, channel or block scales (spec/interop/fp8.md)
    BNB4 = "bnb4"  # bitsandbytes packed 4-bit NF4/FP4 with its quant state (spec/interop/nf4.md)


class QuantMethod(StrEnum):
    """``base_model.quantization.method`` (spec/v1.md §8, Base quantization): how the training base was stored."""

    BNB_NF4 = "bnb-nf4"
    BNB_FP4 = "bnb-fp4"
    BNB_INT8 = "bnb-int8"
    FP8_E4M3 = "fp8-e4m3"
    FP8_E5M2 = "fp8-e5m2"


QUANT_METHODS = tuple(QuantMethod)
#: bitsandbytes 4-bit methods -> bitsandbytes' quant_type
QUANT_4BIT = {QuantMethod.BNB_NF4: "nf4", QuantMethod.BNB_FP4: "fp4"}


class Fp8ScaleLayout(StrEnum):
    """How FP8 weights are scaled (spec/interop/fp8.md): one scale, one per output row, one per tile."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    BLOCK = "block"


FP8_SCALE_LAYOUTS = tuple(Fp8ScaleLayout)
#: dtypes a quantized weight is dequantized to for compute (bitsandbytes' compute dtype)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
#: where ``base_model.quantization`` was read from
QUANT_SOURCES = ("config", "peft-card", "user")


#: safetensors dtype name -> torch dtype attribute name
TORCH_DTYPE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
}


class HubKind(StrEnum):
    """The hub backends (loraformat/hub/)."""

    LOCAL = "local"
    HF = "hf"


# --- validation (spec/v1.md §15) --------------------------------------------------------------------------


class Level(StrEnum):
    """Cumulative validation levels; ``data`` is the default."""

    HEADER = "header"
    DATA = "data"
    BASE = "base"


LEVELS = (Level.HEADER, Level.DATA, Level.BASE)
DEFAULT_LEVEL = Level.DATA


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class FindingCode(StrEnum):
    """Every finding ``validate`` reports; spec/v1.md §15 lists exactly these (tests/test_constants.py)."""

    # header level: the container and the document
    HEADER = "header"
    UNSUPPORTED_VERSION = "unsupported-version"
    SCHEMA = "schema"
    PICKLE_REFUSED = "pickle-refused"
    ADAPTER = "adapter"
    CONFIG = "config"
    INVALID = "invalid"
    UNREADABLE = "unreadable"
    # header level: tensors against the module table
    MISSING_TENSOR = "missing-tensor"
    WRONG_NDIM = "wrong-ndim"
    RANK_MISMATCH = "rank-mismatch"
    METADATA_RANK = "metadata-rank"
    SHAPE_MISMATCH = "shape-mismatch"
    BAD_DTYPE = "bad-dtype"
    BAD_SCALE = "bad-scale"
    UNEXPECTED_TENSOR = "unexpected-tensor"
    SAVED_TENSOR = "saved-tensor"
    # header level: metadata keys
    FORMAT_KEY = "format-key"
    MODELSPEC = "modelspec"
    CONTENT_HASH = "content-hash"
    HASH_ALGORITHM = "hash-algorithm"
    QUANTIZATION = "quantization"
    # data level
    UNREADABLE_TENSOR = "unreadable-tensor"
    NON_FINITE = "non-finite"
    ZERO_DELTA = "zero-delta"
    # base level
    MISSING_TARGET = "missing-target"
    TARGET_SHAPE = "target-shape"
    SAVED_SHAPE = "saved-shape"
    STRUCTURE_HASH = "structure-hash"
    TARGET_DIGEST = "target-digest"
    UNSTAMPED = "unstamped"
    # validate --for ENGINE (loraformat/engine_check.py)
    RANK_ABOVE_CAP = "rank-above-cap"
    FLATTENED_SCALE = "flattened-scale"
    UNSUPPORTED_FEATURE = "unsupported-feature"
    UNSUPPORTED_TARGET = "unsupported-target"
    UNMATCHED_MODULE = "unmatched-module"
    BASE_ARCHITECTURE = "base-architecture"


#: one problem a check found: (code, location, message); validate turns it into a finding with a severity
Problem = tuple[FindingCode, str, str]


# --- compose methods (loraformat/composition.py) ----------------------------------------------------------


class ComposeMethod(StrEnum):
    CAT = "cat"
    LINEAR = "linear"
    SVD = "svd"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"


COMPOSE_METHODS = tuple(ComposeMethod)
#: methods that take --rank
LOWRANK_METHODS = (ComposeMethod.SVD, ComposeMethod.TIES, ComposeMethod.DARE_LINEAR, ComposeMethod.DARE_TIES)
#: methods that build the dense delta and need --density
DENSITY_METHODS = (ComposeMethod.TIES, ComposeMethod.DARE_LINEAR, ComposeMethod.DARE_TIES)
#: methods that draw random masks and take --seed
SEEDED_METHODS = (ComposeMethod.DARE_LINEAR, ComposeMethod.DARE_TIES)

# --- split merges (loraformat/merging/split.py, docs/scale.md) ------------------------------------------------

#: format tag of a split merge's done-file; a change of its fields bumps the number
SHARE_DONE_FORMAT = "loraformat.merge-share/1"
