import pytest

from lmcore.data.stories import builtin_corpus


@pytest.fixture(scope="session")
def story_text() -> str:
    """About 40 KB of the built-in stories (with special tokens and non-ASCII text)."""
    return builtin_corpus(40_000, seed=3)


@pytest.fixture(scope="session")
def story_tokenizer(story_text):
    from lmcore.tokenizer import train_bpe

    return train_bpe([story_text], 700, special_tokens=["<|endoftext|>"])
