import numpy as np

from pipeline.stages.latency import timing_feed, token_stream
from tests.tiny import vocabulary


def test_timing_feed_is_real_text_framed_by_special_tokens(checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint("bert"))
    stream = token_stream(tokenizer, ["Return a new list.", "The parser reads the header."])
    feed = timing_feed(
        stream, tokenizer, ["input_ids", "attention_mask", "token_type_ids"], batch=3, sequence=16
    )
    ids = feed["input_ids"]
    assert ids.shape == (3, 16) and ids.dtype == np.int64
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (
        ids[:, -1] == tokenizer.sep_token_id
    ).all()
    body = ids[:, 1:-1]
    assert set(np.unique(body)) <= set(stream.tolist())
    assert len(np.unique(body)) > 5  # varied tokens, never a constant or all-zero input
    assert feed["attention_mask"].all() and not feed["token_type_ids"].any()
    assert len(vocabulary()) > int(ids.max())


def test_timing_feed_keeps_only_the_graph_inputs(checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint("distilbert"))
    feed = timing_feed(
        token_stream(tokenizer, ["some text here"]),
        tokenizer,
        ["input_ids", "attention_mask"],
        1,
        8,
    )
    assert set(feed) == {"input_ids", "attention_mask"}
