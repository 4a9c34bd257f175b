"""The batch layout, one concept: typed batches (padded, packed, bucketed), the one packer, collation per task,
and the forward over a batch in any layout with outputs in the padded layout; the variable-length attention that
lets a packed row run (:mod:`fastrm.layout.varlen`). It sits below the models: whether packed rows are exact for a
model is decided above them, at load time (:mod:`fastrm.packing`)."""

from fastrm.layout.modes import Batch, arrange
from fastrm.layout.batches import (
    BUCKET_OVERHEAD_TOKENS,
    IGNORE_INDEX,
    MODES,
    Bucket,
    BucketedBatch,
    PackedBatch,
    PaddedBatch,
    bucket,
    pack,
)
from fastrm.layout.shared import SharedPrefixBatch, share
from fastrm.layout.collate import (
    PreferenceBatch,
    RankingBatch,
    collate_preference,
    collate_ranking,
    collate_sequences,
    collate_sft,
    pad_sequences,
)
from fastrm.layout.lengths import length_buckets
from fastrm.layout.varlen import (
    FLASH,
    PackingUnsupported,
    SharedPlan,
    VarlenPlan,
    attention_path,
    base_attention,
    count_varlen_calls,
    disable_varlen,
    enable_varlen,
    first_id,
    packed_forward,
    text_config,
)

__all__ = [
    "BUCKET_OVERHEAD_TOKENS", "FLASH", "IGNORE_INDEX", "MODES", "Batch", "Bucket", "BucketedBatch", "PackedBatch",
    "PackingUnsupported", "PaddedBatch", "PreferenceBatch", "RankingBatch", "SharedPlan", "SharedPrefixBatch", "VarlenPlan", "arrange",
    "attention_path", "base_attention", "bucket", "collate_preference", "collate_ranking", "collate_sequences",
    "collate_sft", "count_varlen_calls", "disable_varlen", "enable_varlen", "first_id", "length_buckets", "pack",
    "pad_sequences", "packed_forward", "share", "text_config",
]
