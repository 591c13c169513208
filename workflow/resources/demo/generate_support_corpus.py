"""Generate the demo customer-support corpus (seeded, so the committed file is reproducible).

Each record is a customer question, an agent answer and an intent label. Questions are built
from openers, intent-specific requests, details and closers so that exact duplicates are rare;
a share of questions is deliberately ambiguous (mentions of two topics, vague wording) and a small
share is mislabelled, so a classifier's held-out accuracy lands well above the majority baseline
but below perfect. A few records carry HTML, e-mail addresses, phone numbers, stray control
characters and exact repeats, so the cleaning stage has real work to do.

Run: python workflow/resources/demo/generate_support_corpus.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

SEED = 20261129
N_RECORDS = 3200
OUT = Path(__file__).with_name("support.jsonl.gz")

PRODUCTS = [
    "headphones",
    "desk lamp",
    "coffee grinder",
    "backpack",
    "keyboard",
    "yoga mat",
    "phone case",
    "water bottle",
    "monitor stand",
    "rain jacket",
    "blender",
    "webcam",
    "running shoes",
    "office chair",
    "tea kettle",
    "bluetooth speaker",
]
CARRIERS = ["the courier", "the post office", "the delivery van", "the parcel service"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NAMES = ["alex", "sam", "jordan", "maria", "li", "priya", "tom", "nora", "omar", "eva"]

OPENERS = [
    "",
    "",
    "Hi,",
    "Hello,",
    "Hi there,",
    "Good morning,",
    "Hey,",
    "Excuse me,",
    "Quick question:",
    "Hoping you can help.",
    "I need some help.",
    "Sorry to bother you,",
]
CLOSERS = [
    "",
    "",
    "",
    "Thanks!",
    "Thank you.",
    "Please advise.",
    "Any help is appreciated.",
    "Can you help?",
    "This is urgent.",
    "Thanks in advance.",
]

REQUESTS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for order {order}.",
        "my card was billed {amount} but the total should have been {amount2}.",
        "why is there an extra fee of {amount} on my invoice?",
        "can I get a copy of the invoice for my {month} purchase?",
        "the payment for my {product} went through two times.",
        "I don't recognise a charge of {amount} on my statement.",
        "how do I update the credit card on my account?",
        "my subscription renewed at {amount} instead of {amount2}.",
    ],
    "shipping": [
        "where is my order {order}? It was supposed to arrive on {month} {day}.",
        "my {product} still hasn't shipped after {days} days.",
        "the tracking number for order {order} shows no updates.",
        "{carrier} says the package was delivered but I never got it.",
        "can I change the delivery address for order {order}?",
        "how long does express shipping take to my area?",
        "my parcel has been stuck in transit for {days} days.",
        "do you ship the {product} internationally?",
    ],
    "returns": [
        "I want to return the {product} I bought in {month}.",
        "how do I send back order {order}? It doesn't fit.",
        "can I exchange my {product} for a different colour?",
        "the {product} arrived damaged and I'd like to return it.",
        "is the return shipping free for order {order}?",
        "I returned my {product} {days} days ago, when will I get my refund?",
        "what is your return policy for opened items?",
        "I need a return label for the {product}.",
    ],
    "password_reset": [
        "I forgot my password and can't log in.",
        "the password reset email never arrives.",
        "the reset link says it has expired.",
        "how do I change my password?",
        "I'm locked out after too many login attempts.",
        "my new password is not accepted.",
        "I can't sign in to my account since yesterday.",
        "the login page keeps saying my password is wrong.",
    ],
    "order_cancel": [
        "please cancel order {order}, I ordered the wrong {product}.",
        "can I still cancel my order from {month} {day}?",
        "I placed order {order} by mistake, how do I cancel it?",
        "I want to cancel the {product} before it ships.",
        "is it too late to cancel order {order}?",
        "cancel my subscription please.",
        "I changed my mind about the {product}, stop the order.",
        "how do I cancel an order that hasn't shipped yet?",
    ],
    "product_info": [
        "is the {product} compatible with my laptop?",
        "what are the dimensions of the {product}?",
        "does the {product} come with a warranty?",
        "is the {product} available in black?",
        "what material is the {product} made of?",
        "when will the {product} be back in stock?",
        "how much does the {product} weigh?",
        "can the {product} be used outdoors?",
    ],
    "account_update": [
        "how do I change the email address on my account?",
        "I moved, please update my home address.",
        "can I change the name on my account to {name}?",
        "how do I delete my account?",
        "I want to stop receiving marketing emails.",
        "how do I add a second shipping address?",
        "please update my phone number.",
        "can I merge my two accounts?",
    ],
    "technical_issue": [
        "the app crashes when I open my order history.",
        "the checkout page shows an error when I pay.",
        "my {product} won't turn on after charging.",
        "the website is very slow today.",
        "the {product} stopped connecting to bluetooth.",
        "I get a blank screen after logging in.",
        "the promo code field gives an error.",
        "the {product} makes a loud noise when it starts.",
    ],
}

ANSWERS: dict[str, list[str]] = {
    "billing": [
        "I'm sorry about the billing trouble. I've checked your account and issued a refund of "
        "the duplicate charge; it should appear within 5 business days.",
        "Thanks for flagging this. The extra amount is a pending authorisation that will drop "
        "off your statement in a few days. If it stays, reply and I will refund it.",
        "You can download every invoice from the Orders page under Billing. I've also emailed "
        "you a copy of the invoice.",
        "To update your card, go to Account, then Payment methods, and add the new card before "
        "removing the old one.",
    ],
    "shipping": [
        "I've checked the tracking and your parcel is on its way; it should arrive within 2 to "
        "3 business days.",
        "Sorry for the delay. I've opened an investigation with the carrier and will send you an "
        "update within 48 hours.",
        "I've updated the delivery address on your order. You'll get a new tracking email shortly.",
        "Express shipping usually takes 1 to 2 business days. We ship to most countries; rates "
        "are shown at checkout.",
    ],
    "returns": [
        "You can start a return from the Orders page within 30 days of delivery. I've emailed you "
        "a prepaid return label.",
        "Sorry it arrived damaged. I've arranged a free replacement and a return label for the "
        "damaged item.",
        "Refunds are processed within 5 business days after we receive the item. Yours is "
        "being processed now.",
        "Exchanges are free. Choose the new colour on the return page and we'll ship it as soon as "
        "the original is scanned by the carrier.",
    ],
    "password_reset": [
        "I've sent a new password reset link to your email; it is valid for one hour. Please check "
        "your spam folder too.",
        "Your account was locked after several attempts. I've unlocked it, and you can reset your "
        "password from the login page.",
        "To change your password, go to Account, then Security, and choose Change password.",
        "Passwords need at least 12 characters. Please try again with a longer one.",
    ],
    "order_cancel": [
        "I've cancelled the order and the refund will reach your card within 5 business days.",
        "The order has already shipped, so it can't be cancelled, but you can return it for free "
        "once it arrives.",
        "Your subscription is cancelled and will not renew. You keep access until the end of "
        "the period.",
        "You can cancel any order that hasn't shipped from the Orders page. I've done it for you "
        "this time.",
    ],
    "product_info": [
        "Yes, it works with all current laptops and comes with a two-year warranty.",
        "The full dimensions and weight are listed under Specifications on the product page; it "
        "is one of our lightest models.",
        "It is back in stock next week. I can notify you by email as soon as it is available.",
        "It is made of recycled materials and is suitable for indoor and outdoor use.",
    ],
    "account_update": [
        "You can change your email and address under Account, then Profile. I've updated it for "
        "you now.",
        "I've unsubscribed you from marketing emails; it can take up to 48 hours to take effect.",
        "Account deletion is permanent. I've sent a confirmation link to your email to "
        "complete it.",
        "I've merged the two accounts; your order history now appears in one place.",
    ],
    "technical_issue": [
        "Sorry about that. Please update the app to the latest version and restart your phone; "
        "that fixes the crash for most customers.",
        "Please try clearing your browser cache or using another browser. Our team is also "
        "looking into the error.",
        "Please hold the power button for 10 seconds to reset the device. If it still fails, "
        "we'll replace it under warranty.",
        "Thanks for reporting this. Our engineers are aware of the problem and a fix is on "
        "the way.",
    ],
}

# Vague questions that could belong to several intents; labelled with one of them at random.
AMBIGUOUS = [
    ("something is wrong with my order {order}.", ["shipping", "billing", "returns"]),
    ("I have a problem with my {product}.", ["technical_issue", "returns", "product_info"]),
    ("I need help with my account.", ["account_update", "password_reset", "billing"]),
    ("what's going on with order {order}?", ["shipping", "order_cancel"]),
    ("I'm not happy with the {product}.", ["returns", "technical_issue"]),
    ("please sort out my subscription.", ["billing", "order_cancel", "account_update"]),
]
LABEL_NOISE = 0.04
AMBIGUOUS_SHARE = 0.12


def _slots(rng: random.Random) -> dict[str, str]:
    amount = rng.randint(5, 400)
    return {
        "order": f"#{rng.randint(100000, 999999)}",
        "amount": f"${amount}.{rng.randint(0, 99):02d}",
        "amount2": f"${max(1, amount - rng.randint(1, 50))}.{rng.randint(0, 99):02d}",
        "product": rng.choice(PRODUCTS),
        "carrier": rng.choice(CARRIERS),
        "month": rng.choice(MONTHS),
        "day": str(rng.randint(1, 28)),
        "days": str(rng.randint(2, 21)),
        "name": rng.choice(NAMES).title(),
    }


def _question(rng: random.Random, body: str) -> str:
    text = body.format(**_slots(rng))
    opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
    if not opener:
        text = text[0].upper() + text[1:]
    return " ".join(part for part in (opener, text, closer) if part)


def _messy(rng: random.Random, text: str) -> str:
    """Add the kinds of noise real tickets carry: markup, contact details, control characters."""
    roll = rng.random()
    if roll < 0.04:
        return f"<p>{text}</p><br>"
    if roll < 0.07:
        who = rng.choice(NAMES)
        return f"{text} You can reach me at {who}.{rng.randint(1, 99)}@example.com."
    if roll < 0.09:
        return f"{text} Call me on +1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}."
    if roll < 0.10:
        return f"{text}\x07\x00  \t "
    return text


def generate(seed: int = SEED, n_records: int = N_RECORDS) -> list[dict[str, str]]:
    rng = random.Random(seed)
    intents = sorted(REQUESTS)
    records = []
    for _ in range(n_records):
        if rng.random() < AMBIGUOUS_SHARE:
            body, choices = rng.choice(AMBIGUOUS)
            intent = rng.choice(choices)
        else:
            intent = rng.choice(intents)
            body = rng.choice(REQUESTS[intent])
        question = _messy(rng, _question(rng, body))
        answer = rng.choice(ANSWERS[intent])
        label = rng.choice(intents) if rng.random() < LABEL_NOISE else intent
        records.append({"question": question, "answer": answer, "intent": label})
    # Exact repeats, as a ticket system exporting twice would produce.
    records.extend(rng.sample(records, k=n_records // 50))
    rng.shuffle(records)
    return records


def write(records: list[dict[str, str]], path: Path = OUT) -> str:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    # mtime=0 keeps the gzip bytes (and so the pinned sha256) identical across runs.
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    digest = write(generate())
    print(f"{OUT}: sha256 {digest}")
