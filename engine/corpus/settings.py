"""Settings of the corpus cache (how segments are built and stored) and of sparse
attention (how a question picks memory blocks), as plain dataclasses that both
backends read. Defaults are the measured choices recorded in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

POSITION_SCHEMES = ("fixed", "block", "ordered")
BUDGETS = ("tally", "mass", "fixed")
SCAN_SCORES = ("cover", "best")
REREADS = ("auto", "never", "always")


@dataclass(frozen=True)
class CacheSettings:
    """How documents become cached segments. Changing any of these changes the
    segments' content, so each is part of a segment's content address."""

    segment_tokens: int = 1024  # tokens prefilled together after the shared prefix
    context_tokens: int = 0  # tail of the previous segment prefilled as read-only context
    block_size: int = 32  # tokens per block, the unit of selection
    precision: str = "int8"  # "int8", "int4" or "fp16"

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "int4", "fp16"):
            raise ValueError(f"unknown cache precision '{self.precision}' (int8, int4, fp16)")
        if self.segment_tokens < self.block_size or self.segment_tokens % self.block_size:
            raise ValueError("segment_tokens must be a positive multiple of block_size")
        if self.context_tokens < 0:
            raise ValueError("context_tokens must be ≥ 0")


@dataclass(frozen=True)
class SparseSettings:
    """How one question chooses and places memory blocks, per layer and KV head.

    The budget is dynamic. By default ("tally") it follows what the question singles
    out: the blocks whose tally — the retrieval heads' standardised scores, summed
    over the scans so far — reaches `hit_ratio` of the best block's are read first
    by every head, each with its `neighbours` successors, and the count is that,
    clamped to [min_blocks, max_blocks]: a question about one fact reads a few
    blocks, one whose answer is spread reads more. Where nothing is singled out (the
    layers before the first scan, scopes within the shortlist that no head scans) a
    head reads `max_blocks`. "mass" is the rule the issue first named (the
    smallest set whose estimated share of the question's attention over memory
    reaches `mass`, clamped likewise); "fixed" reads `max_blocks` (a fixed top-k).
    Candidates come from a bound pass over every block of the scope (per-channel
    key min/max, as in Quest) followed by an exact pass over a shortlist of
    `shortlist_factor × max_blocks` blocks.
    """

    budget: str = "tally"
    # A block is a hit when its tally reaches this share of the best block's. Measured
    # under scan_score "best" (session 6): 0.7 let distractor keys in (multi-key 87%),
    # 0.85 93%. Under "cover" (session 8) a distractor key's fact tallies 0.3-0.48 of
    # the asked one, a further value of the asked key 0.52-1.0: 0.6 reads the values
    # (multi-value 7/15 against 5/15 at 0.85) and keeps the distractors out.
    hit_ratio: float = 0.6
    mass: float = 0.9
    min_blocks: int = 4
    max_blocks: int = 16  # measured (session 5): 100/100 needles 8K-1M, multi-key 87% against 47% with 64
    shortlist_factor: int = 16  # the other heads' shortlist: 256 blocks, as before the budget went to 16
    neighbours: int = 2  # blocks after each chosen block that come with it
    selection_queries: int = 32  # the prompt's last N queries (the question) score the blocks
    # "fixed": InfLLM's one distance for every token; "block": one distance per block,
    # tokens in order inside it; "ordered": blocks in corpus order, packed.
    positions: str = "ordered"
    memory_distance: int = 64  # fixed scheme: how far before the question memory sits
    # What `mass` is a share of: "memory" (the attention the question gives to memory)
    # or "total" (all its attention, sinks and question included).
    budget_share: str = "memory"
    refresh_every: int = 0  # decode steps between fresh selections; 0 keeps the question's
    # Cross-layer vote: each head's block scores, standardised over its candidates,
    # add up across the layers already selected; from the second memory layer on,
    # the `carry_blocks` blocks with most votes join every head's selection.
    carry_blocks: int = 8  # measured: 128K single-needle recall 44% → 92% (docs/BENCHMARKS.md)
    carry_threshold: float = 2.0  # standard deviations above a head's mean before a block earns votes
    # Retrieval heads: the model's `scan_heads` query heads that best pick out a stated
    # fact (measured once per model, engine/corpus/retrieval.py) score every block of
    # the scope exactly instead of through the bounds, once the scope outgrows the
    # shortlist; their winners reach every later layer through the vote.
    scan_heads: int = 12
    scan_carry: int = 8  # blocks the scans' own tally (sum of their standard scores) carries
    # What a scan rates a block by. "cover": each of the question's queries finds its
    # best match in every block, standardised over the scope; a block scores the sum,
    # over the queries, of how far that stands above `scan_threshold` standard
    # deviations, so a block that matches several parts of the question (the key a
    # question names as well as the words every such fact shares) beats one that
    # matches a single part best. "best": the best single match (max over queries).
    # Measured (session 8): multi-key 32K, the asked key at depth 100%, seeds 1 and 2:
    # 10/10 against 8/10; a distractor key's fact had tallied within 1-12% of it.
    scan_score: str = "cover"
    scan_threshold: float = 2.0
    # Re-reading (engine/corpus/reread.py): when the blocks the question singles out
    # lie in two or more separately prefilled runs, "auto" prefills their text again
    # as one segment and answers from that; "never" answers from the cached blocks;
    # "always" re-reads whatever is singled out, one run or many.
    reread: str = "auto"
    # The blocks re-read are those whose tally reaches this share of the best block's
    # (at most as many as `hit_ratio`'s rule allows; where more qualify, `hit_ratio`'s
    # hits). Lower than `hit_ratio`: a further value of a key spread over the corpus
    # tallied 0.46-0.65 of the best in session 11 (re-reading at hit_ratio 0.6 lost a
    # value in 9 of 10 cases at depth 0), the blocks no needle was in at most 0.26; a
    # distractor read with the asked fact is read beside it (multi-key stayed 60/60).
    reread_ratio: float = 0.4
    # Rate a block for re-reading with the one after it (reread.pair_tally): a fact
    # cut by a block edge then tallies whole (128K multi-value 90% → 100%, session
    # 13).
    reread_pairs: bool = True
    # Where more blocks than the budget reach `hit_ratio`, so the layers single
    # nothing out, trigger on the blocks that stand out (reread.steepest_hits). Off
    # by default: at 1M (session 14) it re-read 3 of 3 plain questions of `bench
    # scale` (8-10 runs; first token 9.4-14.5 s against 3.8-4.8 s without) and one
    # of 10 single needles, and the two flat multi-value cases it was made for
    # scored 0.75 and 0.75 re-read, 0.75 and 1.0 from the first pass.
    reread_flat: bool = False
    # Blocks before each re-read block that are read with it (its `neighbours` after
    # it come too), in the same document: a fact whose first words lie in the block
    # before tallies nothing there, and a run that opened on "special magic numbers
    # for ... is: 3336625" lost the sentence's start (1M, session 14: re-read runs
    # held four values, three of them cut so, and the answer listed one).
    reread_before: int = 1

    def __post_init__(self) -> None:
        if self.reread not in REREADS:
            raise ValueError(f"unknown reread rule '{self.reread}' ({', '.join(REREADS)})")
        if self.scan_score not in SCAN_SCORES:
            raise ValueError(f"unknown scan score '{self.scan_score}' ({', '.join(SCAN_SCORES)})")
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"unknown position scheme '{self.positions}' ({', '.join(POSITION_SCHEMES)})")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget rule '{self.budget}' ({', '.join(BUDGETS)})")
        if not 0.0 <= self.hit_ratio <= 1.0:
            raise ValueError("hit_ratio must be in [0, 1]")
        if not 0.0 <= self.reread_ratio <= 1.0:
            raise ValueError("reread_ratio must be in [0, 1]")
        if self.reread_before < 0:
            raise ValueError("reread_before must be at least 0")
        if self.budget_share not in ("memory", "total"):
            raise ValueError(f"unknown budget share '{self.budget_share}' (memory, total)")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError("mass must be in (0, 1]")
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise ValueError("need 1 ≤ min_blocks ≤ max_blocks")

    @classmethod
    def from_dict(cls, values: dict) -> SparseSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})
