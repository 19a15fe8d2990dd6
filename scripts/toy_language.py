"""A deterministic synthetic language: a small stochastic grammar over a Zipfian lexicon.

Usage (from another script in this folder)::

    from toy_language import LanguageSpec, Lexicon, documents
    spec = LanguageSpec()                            # the settings, saved beside results
    lexicon = Lexicon.build(spec)                    # every word, in a fixed order
    for doc in documents(spec, lexicon, count=1000, seed=1):
        ...                                          # "the bako of some tilis runs . ..."

A document is a few sentences on one topic, ending in ``<|endoftext|>``; words are
separated by single spaces (a word-level tokenizer is exact). The grammar::

    S   -> NP(n) VP(n) "."  |  NP(n) VP(n) "," CONJ NP(m) VP(m) "."
    NP(n) -> PRON(n) | DET(n) ADJ* NOUN(n) [PREP NP(m)]   (one level of PP)
    VP(n) -> VI(n) [ADV] | VT(n) NP(m) [PREP NP(k)]

What makes next-token prediction learnable but not trivial, as natural text is:

* Zipf's law: within each open class (nouns, verbs, adjectives, adverbs) the r-th word has
  weight 1 / (r + 1)^zipf, so tokens are imbalanced over two to three orders of magnitude;
* agreement: a verb takes the number of its subject (singular ``runs``, plural ``run``),
  also across a prepositional phrase (``the bako near the tilis runs``): a dependency
  several tokens back;
* selection: subjects are mostly animate nouns, each transitive verb prefers animate or
  inanimate objects;
* topics: every content word has a home topic, boosted ``topic_boost`` times in a
  document on that topic, so the earlier words of a document predict the later ones;
* irreducible entropy: most positions have many plausible continuations, so the loss
  cannot reach zero and the token classes cannot collapse fully (as in language).

Everything is drawn from ``random.Random(seed)``: the same spec, lexicon and seed give the
same text on every machine.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

END = "<|endoftext|>"  # the document boundary (the tokenizer's special token)
UNKNOWN = "[UNK]"
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SINGULAR_DETERMINERS = ("the", "a", "this", "each", "one")
PLURAL_DETERMINERS = ("the", "some", "these", "many", "two")
SINGULAR_PRONOUNS = ("he", "she", "it")
PLURAL_PRONOUNS = ("they", "we")
PREPOSITIONS = ("in", "on", "with", "near", "under", "from", "behind", "over", "of")
CONJUNCTIONS = ("and", "but", "so", "while")
PUNCTUATION = (".", ",")


@dataclass(frozen=True)
class LanguageSpec:
    """The language's settings (counts are word stems; nouns and verbs have two forms)."""

    lexicon_seed: int = 0
    nouns: int = 240
    transitive_verbs: int = 90
    intransitive_verbs: int = 50
    adjectives: int = 70
    adverbs: int = 25
    animate_share: float = 0.4  # nouns that can be subjects
    topics: int = 8
    topic_boost: float = 6.0  # a word's weight in a document on its home topic
    zipf: float = 1.1  # the r-th word of a class has weight 1 / (r + 1)^zipf
    sentences: tuple[int, int] = (3, 8)  # sentences a document, uniform
    p_plural: float = 0.4
    p_pronoun: float = 0.12  # a subject is a pronoun
    p_adjective: float = 0.35  # each further adjective (at most two)
    p_pp: float = 0.25  # a noun phrase takes a prepositional phrase (one level)
    p_adverb: float = 0.3
    p_object_pp: float = 0.2
    p_compound: float = 0.2  # a sentence is two clauses joined by a conjunction
    p_animate_subject: float = 0.9

    def to_dict(self) -> dict[str, object]:
        """The settings as JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class _WordClass:
    """An open class: stems in Zipf order, each with a home topic (and animacy for nouns)."""

    stems: list[str]
    topic: list[int]
    animate: list[bool] = field(default_factory=list)


@dataclass
class Lexicon:
    """Every word of the language, drawn once from ``spec.lexicon_seed``."""

    nouns: _WordClass
    transitive: _WordClass
    intransitive: _WordClass
    adjectives: _WordClass
    adverbs: _WordClass
    object_animate: list[bool]  # per transitive verb: prefers animate objects

    @classmethod
    def build(cls, spec: LanguageSpec) -> Lexicon:
        """Distinct pseudo-word stems (two or three consonant-vowel syllables)."""
        rng = random.Random(spec.lexicon_seed)
        syllables = [c + v for c in CONSONANTS for v in VOWELS]
        pool = ["".join(p) for p in itertools.product(syllables, repeat=2)]
        rng.shuffle(pool)
        reserved = set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + SINGULAR_PRONOUNS
                       + PLURAL_PRONOUNS + PREPOSITIONS + CONJUNCTIONS)
        pool = [w for w in pool if w not in reserved]
        sizes = (spec.nouns, spec.transitive_verbs, spec.intransitive_verbs,
                 spec.adjectives, spec.adverbs)
        if sum(sizes) > len(pool):
            raise ValueError(f"spec: {sum(sizes)} stems asked, {len(pool)} available")
        starts = list(itertools.accumulate(sizes, initial=0))

        def word_class(i: int, suffix: str = "") -> _WordClass:
            stems = [s + suffix for s in pool[starts[i]:starts[i + 1]]]
            return _WordClass(stems, [rng.randrange(spec.topics) for _ in stems])

        nouns = word_class(0)
        nouns.animate = [rng.random() < spec.animate_share for _ in nouns.stems]
        transitive = word_class(1)
        return cls(nouns, transitive, word_class(2), word_class(3), word_class(4, "ly"),
                   [rng.random() < 0.5 for _ in transitive.stems])

    def words(self) -> list[str]:
        """The vocabulary in a fixed order: specials, closed classes, then open classes
        (noun singular and plural ``+s``, verb plural and singular ``+s``)."""
        closed = (SINGULAR_DETERMINERS + PLURAL_DETERMINERS + SINGULAR_PRONOUNS
                  + PLURAL_PRONOUNS + PREPOSITIONS + CONJUNCTIONS + PUNCTUATION)
        out = [END, UNKNOWN, *dict.fromkeys(closed)]
        for cls_ in (self.nouns, self.transitive, self.intransitive):
            out += [w for s in cls_.stems for w in (s, s + "s")]
        return out + self.adjectives.stems + self.adverbs.stems


class _Sampler:
    """Weighted draws from one open class, per topic (cumulative weights, bisect)."""

    def __init__(self, cls_: _WordClass, spec: LanguageSpec,
                 keep: list[bool] | None = None) -> None:
        self.cumulative: list[list[float]] = []
        for topic in range(spec.topics):
            weights = [(1.0 / (r + 2) ** spec.zipf)
                       * (spec.topic_boost if cls_.topic[r] == topic else 1.0)
                       * (1.0 if keep is None or keep[r] else 0.0)
                       for r in range(len(cls_.stems))]
            self.cumulative.append(list(itertools.accumulate(weights)))

    def draw(self, rng: random.Random, topic: int) -> int:
        cum = self.cumulative[topic]
        return bisect.bisect_right(cum, rng.random() * cum[-1])


class _Writer:
    """One document's sentences from the grammar of the module docstring."""

    def __init__(self, spec: LanguageSpec, lexicon: Lexicon) -> None:
        self.spec, self.lex = spec, lexicon
        animate = lexicon.nouns.animate
        self.noun = _Sampler(lexicon.nouns, spec)
        self.animate_noun = _Sampler(lexicon.nouns, spec, animate)
        self.inanimate_noun = _Sampler(lexicon.nouns, spec, [not a for a in animate])
        self.vt = _Sampler(lexicon.transitive, spec)
        self.vi = _Sampler(lexicon.intransitive, spec)
        self.adj = _Sampler(lexicon.adjectives, spec)
        self.adv = _Sampler(lexicon.adverbs, spec)

    def document(self, rng: random.Random) -> str:
        topic = rng.randrange(self.spec.topics)
        low, high = self.spec.sentences
        words: list[str] = []
        for _ in range(rng.randint(low, high)):
            self.clause(rng, topic, words)
            if rng.random() < self.spec.p_compound:
                words += [",", rng.choice(CONJUNCTIONS)]
                self.clause(rng, topic, words)
            words.append(".")
        return " ".join([*words, END])

    def clause(self, rng: random.Random, topic: int, out: list[str]) -> None:
        s = self.spec
        plural = rng.random() < s.p_plural
        if rng.random() < s.p_pronoun:
            out.append(rng.choice(PLURAL_PRONOUNS if plural else SINGULAR_PRONOUNS))
        else:
            animate = rng.random() < s.p_animate_subject
            self.noun_phrase(rng, topic, plural, self.animate_noun if animate
                             else self.inanimate_noun, out, s.p_pp)
        verb_form = "" if plural else "s"  # singular subjects take the -s form
        if rng.random() < 0.5:
            out.append(self.lex.intransitive.stems[self.vi.draw(rng, topic)] + verb_form)
            if rng.random() < s.p_adverb:
                out.append(self.lex.adverbs.stems[self.adv.draw(rng, topic)])
            return
        verb = self.vt.draw(rng, topic)
        out.append(self.lex.transitive.stems[verb] + verb_form)
        objects = self.animate_noun if self.lex.object_animate[verb] else self.inanimate_noun
        self.noun_phrase(rng, topic, rng.random() < s.p_plural, objects, out, s.p_object_pp)

    def noun_phrase(self, rng: random.Random, topic: int, plural: bool, nouns: _Sampler,
                    out: list[str], p_pp: float) -> None:
        s = self.spec
        out.append(rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS))
        for _ in range(2):
            if rng.random() >= s.p_adjective:
                break
            out.append(self.lex.adjectives.stems[self.adj.draw(rng, topic)])
        out.append(self.lex.nouns.stems[nouns.draw(rng, topic)] + ("s" if plural else ""))
        if rng.random() < p_pp:
            out.append(rng.choice(PREPOSITIONS))
            self.noun_phrase(rng, topic, rng.random() < s.p_plural, self.noun, out, 0.0)


def documents(spec: LanguageSpec, lexicon: Lexicon, count: int, seed: int) -> Iterator[str]:
    """``count`` documents drawn from ``random.Random(seed)`` (one line each, no newline)."""
    rng = random.Random(seed)
    writer = _Writer(spec, lexicon)
    for _ in range(count):
        yield writer.document(rng)
