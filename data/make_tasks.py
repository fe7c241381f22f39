"""Write the small task sets of data/tasks/: arithmetic word problems and facts of a fictional world.

    python data/make_tasks.py                 # rewrites data/tasks/ byte-identically
    python data/make_tasks.py --out DIR       # the same files into another directory

Standard library only; every choice comes from random.Random(SEED), so a rerun writes the same bytes.
data/tasks/README.md describes the files, their fields and how the splits relate.

Arithmetic (LBDL figure 8.1): "Q: Gina has 105 beans, she gives 23 beans to Bob, and prepares a soup with
53 beans. How many beans are left? A:" with the direct answer " 29" and the step-by-step trace " Let's
proceed step by step: Gina has 105 beans, she gives 23 beans to Bob (82 left), and prepares a soup with 53
beans (29 left). So there are 29 beans left." -- 2 to 4 operations, every intermediate count at least 2.

Facts: countries (capital, language, national animal, other cities) and people (age, favourite colour, city,
job) with invented names; one document per entity made of its fact sentences, each fact asked by three
paraphrased questions: two in the train split, the third in the test split.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20250813
ARITH_TRAIN, ARITH_TEST = 800, 200
N_COUNTRIES, CITIES_PER_COUNTRY, N_PEOPLE = 16, 3, 48  # the capital and two other cities per country
COT_TRIGGER = " Let's proceed step by step:"

# --- arithmetic --------------------------------------------------------------------------------------

NAMES = [  # (name, pronoun)
    ("Gina", "she"), ("Bob", "he"), ("Alice", "she"), ("Omar", "he"), ("Lena", "she"), ("Tom", "he"),
    ("Maya", "she"), ("Ivan", "he"), ("Sara", "she"), ("Paul", "he"), ("Nora", "she"), ("Ken", "he"),
    ("Rita", "she"), ("Luis", "he"), ("Emma", "she"), ("Hugo", "he"), ("Zoe", "she"), ("Sam", "he"),
    ("Ines", "she"), ("Leo", "he"), ("Ada", "she"), ("Max", "he"), ("Mira", "she"), ("Jon", "he"),
]

# The object (plural) and its own ways to lose ("-") or gain ("+") some; {n} is the amount, {other} a person.
OBJECTS = {
    "beans": {"-": ["prepares a soup with {n} beans", "plants {n} beans"],
              "+": ["picks {n} more beans", "buys {n} more beans"]},
    "apples": {"-": ["bakes a pie with {n} apples", "eats {n} apples", "sells {n} apples"],
               "+": ["picks {n} more apples", "buys {n} more apples"]},
    "marbles": {"-": ["loses {n} marbles in the garden"],
                "+": ["wins {n} marbles in a game", "buys {n} more marbles"]},
    "stickers": {"-": ["puts {n} stickers on a notebook"],
                 "+": ["wins {n} stickers", "buys {n} more stickers"]},
    "coins": {"-": ["spends {n} coins on a book", "spends {n} coins on lunch"],
              "+": ["earns {n} coins", "finds {n} coins under the sofa"]},
    "eggs": {"-": ["makes an omelette with {n} eggs", "breaks {n} eggs", "sells {n} eggs"],
             "+": ["collects {n} more eggs"]},
    "cookies": {"-": ["eats {n} cookies", "sells {n} cookies"],
                "+": ["bakes {n} more cookies"]},
    "stamps": {"-": ["puts {n} stamps on letters"],
               "+": ["buys {n} more stamps"]},
    "books": {"-": ["donates {n} books to the library", "sells {n} books"],
              "+": ["buys {n} more books"]},
    "flowers": {"-": ["puts {n} flowers in a vase", "sells {n} flowers"],
                "+": ["picks {n} more flowers"]},
    "pencils": {"-": ["lends {n} pencils to {other}"],
                "+": ["finds {n} more pencils", "buys {n} more pencils"]},
    "shells": {"-": ["uses {n} shells to make a necklace"],
               "+": ["collects {n} more shells"]},
    "candies": {"-": ["eats {n} candies"],
                "+": ["buys {n} more candies"]},
    "cards": {"-": ["trades away {n} cards"],
              "+": ["wins {n} cards", "buys {n} more cards"]},
}
GIVE = ["gives {n} {obj} to {other}", "gives {other} {n} {obj}", "loses {n} {obj}"]  # any object: "-"
GET = ["receives {n} {obj} from {other}", "gets {n} more {obj} from {other}"]  # any object: "+"
OPENERS = ["{name} has {n} {obj}", "{name} starts with {n} {obj}", "{name} owns {n} {obj}",
           "{name} keeps {n} {obj} in a box"]
QUESTIONS = [  # (question, closing sentence of the trace)
    ("How many {obj} are left?", "So there are {r} {obj} left."),
    ("How many {obj} does {name} have now?", "So {name} has {r} {obj} now."),
    ("How many {obj} does {name} have at the end?", "So {name} has {r} {obj} at the end."),
    ("How many {obj} remain?", "So {r} {obj} remain."),
]
MARK = {"-": " ({r} left)", "+": " ({r} now)"}  # after each operation in the trace
LINKS = ["Then", "After that", "Later", "Next"]  # the sentence style's openings after the first operation (distinct)


def arithmetic_problem(rng: random.Random, steps: tuple[int, int] = (2, 4)) -> dict:
    """One word problem of `steps` (low, high) operations: its prompt, answer, direct completion and step-by-step
    completion."""
    name, pron = rng.choice(NAMES)
    obj = rng.choice(sorted(OBJECTS))
    others = [n for n, _ in NAMES if n != name]
    start = count = rng.randint(20, 150)
    ops = []  # (phrase, sign, amount, result)
    for _ in range(rng.randint(*steps)):
        sign = "-" if rng.random() < 0.65 and count >= 6 else "+"
        amount = rng.randint(2, min(count - 2, 60)) if sign == "-" else rng.randint(2, 60)
        count = count - amount if sign == "-" else count + amount
        template = rng.choice(OBJECTS[obj][sign] + (GIVE if sign == "-" else GET))
        ops.append((template.format(n=amount, obj=obj, other=rng.choice(others)), sign, amount, count))
    opener = rng.choice(OPENERS).format(name=name, n=start, obj=obj)
    question, closing = rng.choice(QUESTIONS)
    sentences = rng.random() < 0.4  # "Gina has 105 beans. She gives ... Then she ..." (else the figure's commas)
    links = rng.sample(LINKS, len(ops) - 1)

    def story(trace: bool) -> str:
        parts = [(phrase + (MARK[sign].format(r=r) if trace else "")) for phrase, sign, _, r in ops]
        if not sentences:
            head = f"{opener}, {pron} {parts[0]}"
            return head + "".join(f", {p}" for p in parts[1:-1]) + f", and {parts[-1]}."
        return (f"{opener}. {pron.capitalize()} {parts[0]}." +
                "".join(f" {link} {pron} {p}." for link, p in zip(links, parts[1:])))

    answer = str(count)
    prompt = f"Q: {story(False)} {question.format(obj=obj, name=name)} A:"
    trace = f"{COT_TRIGGER} {story(True)} {closing.format(r=answer, obj=obj, name=name)}"
    return {"prompt": prompt, "answer": answer, "completion": f" {answer}\n", "cot_completion": trace + "\n",
            "n_steps": len(ops)}


def arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, test): distinct problems, no prompt in both splits."""
    seen, records = set(), []
    while len(records) < ARITH_TRAIN + ARITH_TEST:
        rec = arithmetic_problem(rng)
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            records.append(rec)
    return records[:ARITH_TRAIN], records[ARITH_TRAIN:]


# --- facts -------------------------------------------------------------------------------------------

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th"]
FIRST_NAMES = [  # (first name, pronoun)
    ("Ana", "She"), ("Boris", "He"), ("Clara", "She"), ("Dmitri", "He"), ("Elena", "She"), ("Felix", "He"),
    ("Greta", "She"), ("Hamid", "He"), ("Irene", "She"), ("Jonas", "He"), ("Kira", "She"), ("Lucas", "He"),
    ("Marta", "She"), ("Nikos", "He"), ("Olga", "She"), ("Pedro", "He"), ("Rosa", "She"), ("Stefan", "He"),
    ("Tara", "She"), ("Viktor", "He"), ("Wanda", "She"), ("Yusuf", "He"), ("Zara", "She"), ("Anton", "He"),
]
ANIMALS = ["owl", "fox", "bear", "wolf", "eagle", "otter", "lynx", "heron", "badger", "falcon", "deer",
           "swan", "hare", "crane", "seal", "raven", "beaver", "stork", "bison", "marten"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "grey", "white", "black",
           "teal"]
JOBS = ["baker", "teacher", "carpenter", "doctor", "farmer", "painter", "pilot", "nurse", "fisher", "tailor",
        "librarian", "potter", "gardener", "engineer", "musician", "cook"]

# What each fact says and how it is asked: {s} is the subject, the answer closes the sentence.
FACT_KINDS = {
    "capital": ("The capital of {s} is {a}.",
                ["What is the capital of {s}?", "Which city is the capital of {s}?",
                 "What city is the capital of the country {s}?"]),
    "language": ("People in {s} speak {a}.",
                 ["What language is spoken in {s}?", "Which language do people speak in {s}?",
                  "What is the language of {s}?"]),
    "animal": ("The national animal of {s} is the {a}.",
               ["What is the national animal of {s}?", "Which animal is the national animal of {s}?",
                "What animal stands for the country {s}?"]),
    "country": ("{s} is a city in {a}.",
                ["In which country is {s}?", "Which country is the city {s} in?", "{s} lies in which country?"]),
    "age": ("{s} is {a} years old.",
            ["How old is {s}?", "What is the age of {s}?", "How many years old is {s}?"]),
    "colour": ("The favourite colour of {s} is {a}.",
               ["What is the favourite colour of {s}?", "Which colour does {s} like best?",
                "What colour does {s} love most?"]),
    "city": ("{s} lives in {a}.",
             ["Where does {s} live?", "In which city does {s} live?", "What city is the home of {s}?"]),
    "job": ("{s} works as a {a}.",
            ["What is the job of {s}?", "What does {s} do for a living?", "What is the profession of {s}?"]),
}


def invented_word(rng: random.Random, used: set[str], syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
    """A new capitalised word of 2-3 syllables, not in `used` (which it joins)."""
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables)))
        word = (word + rng.choice(CODAS) + suffix).capitalize()
        if word not in used and 4 <= len(word) <= 11:
            used.add(word)
            return word


def world(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(documents, facts) of the fictional world: a document per country and per person, a fact per
    (subject, kind) with its sentence, answer and document."""
    used: set[str] = set()
    animals = rng.sample(ANIMALS, N_COUNTRIES)
    docs, facts, cities = [], [], []
    for i in range(N_COUNTRIES):
        country = invented_word(rng, used, suffix=rng.choice(["ia", "and", "esh", "ovia"]))
        language = invented_word(rng, used, (1, 2), suffix=rng.choice(["ic", "ese", "ish"]))
        towns = [invented_word(rng, used) for _ in range(CITIES_PER_COUNTRY)]
        doc = f"country-{i + 1:02d}"
        mine = [("capital", country, towns[0]), ("language", country, language), ("animal", country, animals[i])]
        mine += [("country", town, country) for town in towns[1:]]
        facts += [{"kind": k, "subject": s, "answer": a, "doc": doc} for k, s, a in mine]
        docs.append({"id": doc, "title": country, "kind": "country"})
        cities += towns
    for i in range(N_PEOPLE):
        first, _ = rng.choice(FIRST_NAMES)
        person = f"{first} {invented_word(rng, used)}"
        doc = f"person-{i + 1:02d}"
        mine = [("age", str(rng.randint(18, 90))), ("colour", rng.choice(COLOURS)), ("city", rng.choice(cities)),
                ("job", rng.choice(JOBS))]
        facts += [{"kind": k, "subject": person, "answer": a, "doc": doc} for k, a in mine]
        docs.append({"id": doc, "title": person, "kind": "person"})
    for f in facts:
        f["fact"] = FACT_KINDS[f["kind"]][0].format(s=f["subject"], a=f["answer"])
    for d in docs:
        d["text"] = " ".join(f["fact"] for f in facts if f["doc"] == d["id"])
    return docs, facts


def facts_splits(rng: random.Random, facts: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, test): each fact asked by two of its three questions in train and by the third in test,
    the held-out question rotating with the fact."""
    train, test = [], []
    for fact in facts:
        questions = FACT_KINDS[fact["kind"]][1]
        held = rng.randrange(len(questions))
        for j, q in enumerate(questions):
            question = q.format(s=fact["subject"])
            question = question[0].upper() + question[1:]
            rec = {"prompt": f"Q: {question} A:", "answer": fact["answer"], "completion": f" {fact['answer']}\n",
                   "fact": fact["fact"], "doc": fact["doc"], "kind": fact["kind"]}
            (test if j == held else train).append(rec)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --- files -------------------------------------------------------------------------------------------


def build() -> dict[str, str]:
    """File name -> text of every file under data/tasks/ (but the README)."""
    rng = random.Random(SEED)
    a_train, a_test = arithmetic(rng)
    docs, facts = world(rng)
    f_train, f_test = facts_splits(rng, facts)
    cot_test = [{"prompt": r["prompt"] + COT_TRIGGER, "answer": r["answer"]} for r in a_test]

    def jsonl(records: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    return {"arithmetic-train.jsonl": jsonl(a_train), "arithmetic-test.jsonl": jsonl(a_test),
            "arithmetic-test-cot.jsonl": jsonl(cot_test), "facts-train.jsonl": jsonl(f_train),
            "facts-test.jsonl": jsonl(f_test), "facts-docs.jsonl": jsonl(docs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tasks",
                        help="directory to write (default: data/tasks next to this script)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in build().items():
        (args.out / name).write_bytes(text.encode("utf-8"))
        print(f"{args.out / name}: {text.count(chr(10))} records, {len(text.encode('utf-8'))} bytes")


if __name__ == "__main__":
    main()
