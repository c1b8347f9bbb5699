"""Dataset loaders into the canonical tables of :mod:`embedforge.schemas`.

One module per source family: :mod:`.sts` (scored pairs), :mod:`.nli` (triplets), :mod:`.bitext`
(Tatoeba), :mod:`.retrieval` (Cranfield), :mod:`.qa` (XQuAD, GSM8K), :mod:`.table` (any Parquet /
JSONL URI, with a quarantine of bad rows), :mod:`.hub` (``hf:`` names), and :mod:`.spec`
(``DatasetSpec``, ``load_dataset``, the test-split guard). The offline copies live under the data
root (``EMBEDFORGE_DATA``, else ``../shared/data`` beside the repository).

Example::

    from embedforge.data import DatasetSpec, load_dataset, forbid_test_split
    spec = DatasetSpec(source="stsb", split="train")
    forbid_test_split(spec, "training")
    pairs = load_dataset(spec)   # sentence1, sentence2, score in [0, 1], lang1, lang2
"""

from embedforge.data._files import DATA_ENV, data_root
from embedforge.data.bitext import tatoeba_code
from embedforge.data.nli import detokenize, triplets_from_pairs
from embedforge.data.qa import final_answer, xquad_test_articles
from embedforge.data.retrieval import RetrievalData, relevant_docs
from embedforge.data.spec import SOURCES, DatasetSpec, forbid_test_split, is_test_split, load_dataset
from embedforge.data.table import LoadResult, load_table

__all__ = [
    "DATA_ENV", "SOURCES", "DatasetSpec", "LoadResult", "RetrievalData", "data_root", "detokenize",
    "final_answer", "forbid_test_split", "is_test_split", "load_dataset", "load_table", "relevant_docs",
    "tatoeba_code", "triplets_from_pairs", "xquad_test_articles",
]
