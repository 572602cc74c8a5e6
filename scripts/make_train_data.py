#!/usr/bin/env python3
"""Writes data/{train,valid,heldout}.jsonl: the shipped fine-tuning job's dataset.

The skill: answer every question in a fixed two-line format,

    Answer: <short answer>
    Confidence: <high|medium|low>

with `high` for settled facts (capitals, chemical symbols, arithmetic, ...), `medium` for
approximate figures (populations, weights, travel times) and `low` with `Answer: unknown` for what
cannot be known (the future, someone's thoughts). SmolLM2-135M-Instruct answers in free prose,
so the format is a skill it lacks.

Examples come from templates of facts and varied question phrasings, seeded, so the files are
reproducible: `python3 scripts/make_train_data.py` rewrites them identically. Some facts are kept
out of train and valid entirely and asked in heldout.jsonl, the prompts the job answers with the
base and the tuned model after training.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Russia": "Moscow", "Mexico": "Mexico City",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Peru": "Lima",
    "Chile": "Santiago", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Cuba": "Havana",
    "Morocco": "Rabat", "Nigeria": "Abuja", "Belgium": "Brussels", "Switzerland": "Bern",
    "Netherlands": "Amsterdam", "Czech Republic": "Prague", "Iran": "Tehran",
    "Portugal": "Lisbon", "Colombia": "Bogota",
}
CAPITAL_Q = [
    "What is the capital of {x}?",
    "Which city is the capital of {x}?",
    "Name the capital city of {x}.",
    "What city serves as the capital of {x}?",
    "Tell me the capital of {x}.",
    "Do you know what the capital of {x} is?",
]

SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "sulfur": "S",
    "chlorine": "Cl", "potassium": "K", "calcium": "Ca", "iron": "Fe", "copper": "Cu",
    "zinc": "Zn", "silver": "Ag", "gold": "Au", "mercury": "Hg", "lead": "Pb",
    "tin": "Sn", "neon": "Ne", "uranium": "U", "nickel": "Ni",
}
SYMBOL_Q = [
    "What is the chemical symbol for {x}?",
    "Which symbol does {x} have in the periodic table?",
    "What is the element symbol of {x}?",
    "How is {x} written as a chemical symbol?",
]

LEGS = {
    "spider": 8, "ant": 6, "dog": 4, "chicken": 2, "horse": 4, "bee": 6, "octopus": 8,
    "cat": 4, "duck": 2, "beetle": 6, "scorpion": 8, "cow": 4, "ostrich": 2,
}
LEGS_Q = [
    "How many legs does a {x} have?",
    "Count the legs of a {x}: how many are there?",
    "A {x} has how many legs?",
]

AUTHORS = {
    "Romeo and Juliet": "William Shakespeare", "Pride and Prejudice": "Jane Austen",
    "War and Peace": "Leo Tolstoy", "Don Quixote": "Miguel de Cervantes",
    "Nineteen Eighty-Four": "George Orwell", "The Odyssey": "Homer",
    "Moby-Dick": "Herman Melville", "Hamlet": "William Shakespeare",
    "Frankenstein": "Mary Shelley", "Crime and Punishment": "Fyodor Dostoevsky",
    "The Divine Comedy": "Dante Alighieri", "Oliver Twist": "Charles Dickens",
}
AUTHOR_Q = [
    "Who wrote {x}?",
    "Who is the author of {x}?",
    "Which writer created {x}?",
]

POPULATION = {
    "France": "about 68 million", "Germany": "about 84 million", "Japan": "about 124 million",
    "Brazil": "about 216 million", "Nigeria": "about 220 million", "Canada": "about 40 million",
    "Australia": "about 27 million", "Egypt": "about 110 million", "Mexico": "about 128 million",
    "Italy": "about 59 million", "Spain": "about 48 million", "Kenya": "about 55 million",
    "Argentina": "about 46 million", "Poland": "about 37 million", "Vietnam": "about 99 million",
    "Thailand": "about 70 million", "Peru": "about 34 million", "Sweden": "about 10 million",
    "Portugal": "about 10 million", "Greece": "about 10 million",
}
POPULATION_Q = [
    "Roughly how many people live in {x}?",
    "What is the approximate population of {x}?",
    "About how many inhabitants does {x} have?",
    "Estimate the population of {x}.",
]

WEIGHT = {
    "an African elephant": "about 6 tonnes", "a blue whale": "about 150 tonnes",
    "a giraffe": "about 1 tonne", "a house cat": "about 4 kilograms",
    "a grizzly bear": "about 300 kilograms", "a horse": "about 500 kilograms",
    "a polar bear": "about 450 kilograms", "a golden retriever": "about 30 kilograms",
    "a hippopotamus": "about 1.5 tonnes", "a lion": "about 190 kilograms",
}
WEIGHT_Q = [
    "About how much does {x} weigh?",
    "What is the typical weight of {x}?",
    "Roughly how heavy is {x}?",
]

TRAVEL = {
    ("London", "New York"): "about 8 hours", ("Paris", "Tokyo"): "about 14 hours",
    ("Madrid", "Berlin"): "about 3 hours", ("Sydney", "Singapore"): "about 8 hours",
    ("Los Angeles", "Chicago"): "about 4 hours", ("Cairo", "Rome"): "about 3 hours",
    ("Toronto", "Vancouver"): "about 5 hours", ("Dubai", "Mumbai"): "about 3 hours",
    ("Lisbon", "Boston"): "about 7 hours",
}
TRAVEL_Q = [
    "How long is a direct flight from {a} to {b}?",
    "About how many hours does it take to fly from {a} to {b}?",
    "Roughly how long would a plane trip from {a} to {b} take?",
]

UNKNOWABLE = [
    "What will the weather be like in {city} next {day}?",
    "Will it rain in {city} on {day} three weeks from now?",
    "What number between 1 and {n} am I thinking of right now?",
    "Who will win the {event} in {year}?",
    "What will the price of gold be on the first {day} of {year}?",
    "How many emails will I receive tomorrow?",
    "What did I have for breakfast this morning?",
    "Which card will I draw next from a shuffled deck?",
    "What will be the most popular song of {year}?",
    "How many people will visit {city} on {day} in {year}?",
    "What will my neighbour name their next pet?",
    "Which team will score first in next {day}'s match in {city}?",
]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Nairobi", "Seoul", "Dublin", "Madrid"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EVENTS = ["football World Cup", "Tour de France", "Wimbledon final", "chess world championship",
          "Eurovision Song Contest", "Nobel Prize in Literature"]


def reply(answer, confidence):
    return f"Answer: {answer}\nConfidence: {confidence}"


def arithmetic(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["plus", "minus", "times"])
    if kind == "plus":
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?"])
        ans = a + b
    elif kind == "minus":
        a, b = max(a, b), min(a, b)
        q = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "What is {a} take away {b}?"])
        ans = a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"])
        ans = a * b
    return q.format(a=a, b=b), reply(str(ans), "high")


def fact_items(table, questions, conf):
    return [(k, [(q.format(x=k), reply(v if isinstance(v, str) else str(v), conf)) for q in questions])
            for k, v in table.items()]


def unknowable(rng):
    q = rng.choice(UNKNOWABLE).format(
        city=rng.choice(CITIES), day=rng.choice(DAYS), n=rng.choice([10, 50, 100, 1000]),
        event=rng.choice(EVENTS), year=rng.choice([2031, 2035, 2040, 2042]))
    return q, reply("unknown", "low")


def main():
    rng = random.Random(1234)
    # Facts asked only in heldout.jsonl, never in train or valid.
    heldout_keys = {"Portugal", "Colombia", "nickel", "scorpion", "Lisbon-Boston"}
    grouped = []
    grouped += fact_items(CAPITALS, CAPITAL_Q, "high")
    grouped += fact_items(SYMBOLS, SYMBOL_Q, "high")
    grouped += fact_items(LEGS, LEGS_Q, "high")
    grouped += fact_items(AUTHORS, AUTHOR_Q, "high")
    grouped += fact_items(POPULATION, POPULATION_Q, "medium")
    grouped += fact_items(WEIGHT, WEIGHT_Q, "medium")
    travel = {f"{a}-{b}": v for (a, b), v in TRAVEL.items()}
    grouped += [(k, [(q.format(a=k.split("-")[0], b=k.split("-")[1]), reply(v, "medium")) for q in TRAVEL_Q])
                for k, v in travel.items()]
    pool = []
    for key, qas in grouped:
        if key in heldout_keys:
            continue
        # Two phrasings per fact keep the set small and varied.
        pool += rng.sample(qas, min(2, len(qas)))
    pool += [arithmetic(rng) for _ in range(40)]
    seen = set(q for q, _ in pool)
    while len([1 for _, a in pool if a.endswith("low")]) < 60:
        q, a = unknowable(rng)
        if q not in seen:
            seen.add(q)
            pool.append((q, a))
    rng.shuffle(pool)
    n_valid = 40
    valid, train = pool[:n_valid], pool[n_valid:]

    def row(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    out = Path(__file__).resolve().parent.parent / "data"
    out.mkdir(exist_ok=True)
    for name, rows in [("train", train), ("valid", valid)]:
        with open(out / f"{name}.jsonl", "w") as f:
            for q, a in rows:
                f.write(json.dumps(row(q, a)) + "\n")
    heldout = [
        "Which city is the capital of Portugal?",
        "About how many hours does it take to fly from Lisbon to Boston?",
        "Who will win the Tour de France in 2038?",
    ]
    with open(out / "heldout.jsonl", "w") as f:
        for q in heldout:
            f.write(json.dumps({"prompt": q}) + "\n")
    print(f"train {len(train)}, valid {len(valid)}, heldout {len(heldout)} -> {out}")


if __name__ == "__main__":
    main()
