"""Generate the support-intents task: classify an online shop's customer message into one of 10 intents.

Deterministic (seeded): `python data/intents/generate.py` rewrites train.jsonl and test.jsonl beside
this file. Every message is built from an intent's phrasings, slot values (order numbers, products,
cities) and an optional greeting or sign-off. A quarter of each intent's phrasings appear only in the
test split, so the test set asks for generalization, not recall; no test message occurs in train,
even after normalizing case and whitespace. validation.jsonl (10 rows per intent) is drawn the way the test
rows are, half from the held-out phrasings, as a team would label a sample of live traffic to choose a
threshold on; it shares no message with train or test, and is made after them with a seed of its own, so
train.jsonl and test.jsonl are the same with or without it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INTENTS = {
    "cancel_order": [
        "I want to cancel order {order}",
        "please cancel my order {order}, I changed my mind",
        "can you stop order {order} before it ships?",
        "I ordered the {product} by mistake, cancel it",
        "cancel the {product} I bought yesterday",
        "how do I cancel an order I just placed?",
        "don't send order {order}, I no longer need it",
        "I need to call off my purchase of the {product}",
    ],
    "track_order": [
        "where is my order {order}?",
        "has order {order} shipped yet",
        "when will my {product} arrive?",
        "can I get a tracking number for order {order}",
        "my {product} still hasn't shown up, where is it",
        "what's the delivery status of {order}",
        "is my package on its way to {city}?",
        "how long until order {order} gets here",
    ],
    "return_item": [
        "I want to return the {product}",
        "how do I send back order {order}?",
        "the {product} doesn't fit, can I return it",
        "I'd like a return label for my {product}",
        "the {product} arrived broken and I want to send it back",
        "can I return something I bought 20 days ago?",
        "start a return for order {order} please",
        "I need to exchange the {product} for a different size",
    ],
    "refund_status": [
        "where is my refund for order {order}?",
        "I returned the {product} but haven't got my money back",
        "when will the refund show up on my card",
        "has my refund for {order} been processed?",
        "it's been two weeks and no refund for the {product}",
        "how long do refunds take?",
        "you still owe me money for order {order}",
        "did you receive my returned {product}? waiting on the refund",
    ],
    "change_address": [
        "I need to change the delivery address for order {order}",
        "please ship my {product} to {city} instead",
        "I moved to {city}, update my shipping address",
        "wrong address on order {order}, can you fix it",
        "can I redirect my package to my office in {city}?",
        "update the address on my account to {city}",
        "send order {order} to a different address please",
        "I typed my street wrong for the {product} order",
    ],
    "payment_failed": [
        "my card was declined when buying the {product}",
        "payment failed for order {order}",
        "why won't my payment go through?",
        "checkout keeps giving me a payment error",
        "I was charged but order {order} says payment failed",
        "my paypal payment for the {product} didn't work",
        "the site rejected my credit card twice",
        "can't pay for my cart, it says transaction declined",
    ],
    "reset_password": [
        "I forgot my password",
        "how do I reset my password?",
        "I can't log in to my account",
        "the password reset email never arrived",
        "locked out of my account after too many attempts",
        "please help me change my password",
        "my login isn't working anymore",
        "reset link says expired, I need a new password",
    ],
    "update_email": [
        "I want to change the email on my account",
        "how do I update my email address?",
        "please use my new email for order {order} updates",
        "my old email is closed, switch my account to a new one",
        "change the contact email on my profile",
        "receipts go to the wrong email address",
        "can I swap the email linked to my account",
        "update my account email, I got a new one",
    ],
    "product_availability": [
        "is the {product} in stock?",
        "when will the {product} be available again",
        "do you ship the {product} to {city}?",
        "the {product} says sold out, will you restock it",
        "do you have the {product} in a larger size",
        "can I preorder the {product}?",
        "is the {product} available in blue",
        "any chance the {product} comes back soon",
    ],
    "speak_to_human": [
        "I want to talk to a real person",
        "can I speak to an agent please",
        "connect me with customer service",
        "this bot isn't helping, get me a human",
        "what's your phone number, I need to call someone",
        "transfer me to a representative",
        "is there a live person I can chat with about order {order}",
        "I need a manager about my {product} complaint",
    ],
}

PRODUCTS = [
    "running shoes",
    "rain jacket",
    "coffee grinder",
    "desk lamp",
    "wool sweater",
    "phone case",
    "backpack",
    "blender",
    "yoga mat",
    "headphones",
    "water bottle",
    "winter boots",
    "office chair",
    "bed sheets",
    "sunglasses",
    "kettle",
    "laptop stand",
    "hiking socks",
    "air fryer",
    "wall clock",
]
CITIES = ["Lisbon", "Denver", "Osaka", "Leeds", "Toronto", "Lyon", "Austin", "Porto", "Seoul", "Bergen"]
OPENERS = ["", "", "", "hi, ", "hello, ", "hey there, ", "good morning, ", "quick question: ", "urgent: "]
CLOSERS = ["", "", "", " thanks", " thank you!", " asap please", " - thanks in advance", "??", "."]


def message(rng: random.Random, phrasing: str) -> str:
    text = phrasing.format(order=f"#{rng.randint(10000, 99999)}", product=rng.choice(PRODUCTS), city=rng.choice(CITIES))
    text = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def normalized(text: str) -> str:
    """How the pipeline compares rows for duplicates and leaks: case and whitespace do not count."""
    return " ".join(text.lower().split())


def generate(
    train_per_intent: int = 80,
    test_per_intent: int = 20,
    validation_per_intent: int = 10,
    seed: int = 0,
    unseen: list | None = None,
) -> tuple[list, list, list]:
    """unseen, where given, collects the test messages built from a phrasing training never shows."""
    rng = random.Random(seed)
    train, test = [], []
    phrasings_of: dict[str, tuple[list, list]] = {}
    taken: dict[str, str] = {}  # normalized texts used by any intent so far: no message has two labels
    for label, phrasings in INTENTS.items():
        shuffled = phrasings[:]
        rng.shuffle(shuffled)
        held_out = shuffled[: len(shuffled) // 4]  # these phrasings never appear in training
        seen = shuffled[len(held_out) :]
        phrasings_of[label] = (held_out, seen)
        train_texts: dict[str, str] = {}
        while len(train_texts) < train_per_intent:
            text = message(rng, rng.choice(seen))
            if normalized(text) not in taken:
                train_texts.setdefault(normalized(text), text)
        test_texts: dict[str, str] = {}
        while len(test_texts) < test_per_intent:
            pool = held_out if rng.random() < 0.5 else seen
            text = message(rng, rng.choice(pool))
            if normalized(text) not in train_texts and normalized(text) not in taken:
                if normalized(text) not in test_texts and pool is held_out and unseen is not None:
                    unseen.append(text)
                test_texts.setdefault(normalized(text), text)
        taken.update(train_texts)
        taken.update(test_texts)
        train += [{"text": t, "label": label} for t in sorted(train_texts.values())]
        test += [{"text": t, "label": label} for t in sorted(test_texts.values())]
    rng.shuffle(train)
    rng.shuffle(test)
    validation = []
    drawn = random.Random(seed + 1)  # its own stream: train and test do not depend on it
    for label, (held_out, seen) in phrasings_of.items():
        texts: dict[str, str] = {}
        while len(texts) < validation_per_intent:
            text = message(drawn, drawn.choice(held_out if drawn.random() < 0.5 else seen))
            if normalized(text) not in taken:  # every train and test message of every intent by now
                texts.setdefault(normalized(text), text)
        taken.update(texts)
        validation += [{"text": t, "label": label} for t in sorted(texts.values())]
    drawn.shuffle(validation)
    return train, test, validation


def main() -> None:
    folder = Path(__file__).resolve().parent
    unseen: list = []
    train, test, validation = generate(unseen=unseen)
    for name, rows in (("train", train), ("test", test), ("validation", validation)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{folder / name}.jsonl: {len(rows)} rows")
    print(
        f"test: {len(test) - len(unseen)} of {len(test)} messages built from a phrasing training also uses, "
        f"{len(unseen)} from one training never shows"
    )


if __name__ == "__main__":
    main()
