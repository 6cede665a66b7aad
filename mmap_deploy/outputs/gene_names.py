"""Names the user gives for the model's genes (`--plot`, `--genes`): matched case-insensitively, misses named."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def resolve_names(names: list[str], genes: list[str], model: str | Path, *, flag: str = "--plot",
                  columns: tuple[str, ...] = ()) -> list[str]:
    """`names` as the model spells its genes (matched case-insensitively), or as `columns` are named.

    A name that is neither a gene of `genes` nor one of `columns` is a
    UserError of one line that names the model's nearest genes.
    """
    import difflib

    known = set(genes) | set(columns)
    by_fold: dict[str, str] = {}
    for g in [*genes, *columns]:
        by_fold.setdefault(g.casefold(), g)
    resolved, unknown = [], []
    for g in names:
        name = g if g in known else by_fold.get(g.casefold())
        if name is None:
            unknown.append(g)
        else:
            resolved.append(name)
    if unknown:
        shown = ", ".join(genes[:5]) + (", ..." if len(genes) > 5 else "")
        gene_fold: dict[str, str] = {}
        for g in genes:
            gene_fold.setdefault(g.casefold(), g)
        near = []
        for g in unknown:
            close = [gene_fold[c] for c in difflib.get_close_matches(g.casefold(), list(gene_fold), n=3, cutoff=0.6)]
            if close:
                near.append(f"{g}: did you mean {' or '.join(close)}?")
        hint = f"; {'; '.join(near)}" if near else ""
        also = f"; per-spot columns: {', '.join(columns)}" if columns else ""
        raise UserError(
            f"{flag}: gene(s) {', '.join(unknown)} not predicted by the model {model} "
            f"(it predicts {len(genes)} genes: {shown}){hint}{also}; check the spelling "
            "(mmap-predict --list-genes prints them all)"
        )
    return list(dict.fromkeys(resolved))
