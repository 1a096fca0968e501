"""The paper's prompt templates, word for word, as plain strings (no TensorFlow here).

Every list of items is rendered as `<entry>; <entry>; ... <entry>;` -- each entry carries its own
trailing ";" -- so that all joins happen at white space. SentencePiece never merges pieces across
white space, hence the token sequence of a prompt equals the concatenation of the token sequences
of its parts; the tasks rely on this to assemble and truncate prompts at the token level.
"""

from __future__ import annotations

import dataclasses

from recalign.data.ingest import Domain

MASK = "[masked item]"


@dataclasses.dataclass(frozen=True)
class Templates:
  domain: Domain = Domain()

  @property
  def history(self) -> str:
    d = self.domain
    return (f"A user has {d.verb_past} the following {d.noun} "
            "(arranged in chronological order, from earliest to most recent):")

  @property
  def retrieval(self) -> str:
    return f"What would the user {self.domain.verb} next?"

  @property
  def ranking(self) -> str:
    return (f"Which of the following candidate items would you recommend the user to {self.domain.verb} "
            "next? Candidate items are:")

  @property
  def liked(self) -> str:
    return f"A user likes the following {self.domain.noun}:"

  @property
  def disliked(self) -> str:
    return f"The user dislikes the following {self.domain.noun}:"

  @property
  def rating(self) -> str:
    return "Predict whether the user would like the following item. Answer yes or no."

  @property
  def mim(self) -> str:
    return "What are the masked items, in chronological order?"

  @property
  def bpr(self) -> str:
    return f"Which of the following two items would the user {self.domain.verb} next?"

  # Item QA ("item embedding") questions: attribute -> question about an ID, and title -> ID.
  QA = {"title": "What's the title of {id}?", "brand": "What's the brand of {id}?",
        "price": "What's the price of {id}?", "categories": "What's the category of {id}?"}
  QA_ID = "What's the item ID of the item titled {title}?"

  def all_text(self) -> list[str]:
    """Every fixed string, for vocabulary training."""
    return [self.history, self.retrieval, self.ranking, self.liked, self.disliked, self.rating,
            self.mim, self.bpr, MASK + ";", "yes", "no", "None;", *self.QA.values(), self.QA_ID]


ENTRY_PREFIX = "Item ID:"


def entry_suffix(title: str = "", with_title: bool = True) -> str:
  """What follows the ID in an entry, with no space before it: `, Title: <title>` or nothing."""
  return f", Title: {title}" if (with_title and title) else ""


def entry(iid: str, title: str = "", with_title: bool = True, prefix: bool = True) -> str:
  """One item as the paper writes it: `Item ID: I123, Title: <title>` (ID only without a title;
  without `prefix`, the compact `I123`).

  Prompts are assembled from the tokens of ENTRY_PREFIX, of the ID alone and of the suffix, so an
  ID has one tokenisation everywhere (prompts, targets, the decoding trie) whatever the vocabulary.
  """
  return f"{ENTRY_PREFIX + ' ' if prefix else ''}{iid}{entry_suffix(title, with_title)}"


def item_list(entries: list[str]) -> str:
  """`a; b; c;` -- empty lists render as `None;` so that the prompt stays well formed."""
  return " ".join(e + ";" for e in entries) if entries else "None;"
