"""The built-in demo task: customer-support intents, generated here, seeded.

Twenty intents, each from several phrasings with slots (order numbers, dates, products,
amounts), a share of typos, a slice of long or ambiguous messages (chatter first, two topics,
the request last), and in val and test 15% held-out wording that train never shows: the mined
rules cannot match it and a small model trained on train has not seen it, while a pre-trained
large model can still read it. Written as a
dataset dir like any other (`train/val/test.jsonl`, `labels.json`).
"""

from __future__ import annotations

import random
from pathlib import Path

from cascade.data import Example, write_dataset

INTENTS: dict[str, list[str]] = {
    "track_order": ["where is my order {order}", "has order {order} shipped yet", "can you track my package {order}",
                    "when will my {product} arrive", "my order {order} still has not arrived",
                    "what's the delivery status of {order}", "is my {product} on its way"],
    "cancel_order": ["cancel my order {order}", "please cancel order {order} before it ships",
                     "i don't want the {product} anymore, cancel it", "stop my order {order}",
                     "how do i cancel an order i placed on {date}", "cancel the purchase i made today"],
    "return_item": ["how do i return the {product}", "i want to send back my {product}",
                    "return label for order {order} please", "can i return something i bought on {date}",
                    "the {product} doesn't fit, i'd like to return it", "start a return for {order}"],
    "refund_status": ["where is my refund for {order}", "i returned the {product} but got no money back",
                      "when will i get my {amount} refund", "refund for order {order} still pending",
                      "has my refund been processed", "it's been two weeks and no refund"],
    "change_address": ["change the shipping address on {order}", "i moved, update my delivery address",
                       "ship order {order} to a different address", "wrong address on my order, can i fix it",
                       "update my address before {date}"],
    "payment_failed": ["my card was declined", "payment failed for order {order}",
                       "why did my payment of {amount} fail",
                       "checkout keeps rejecting my card", "transaction error when paying"],
    "update_payment_method": ["how do i change my credit card", "update my payment method",
                              "add a new card to my account", "remove my old card and use paypal",
                              "i want to pay with a different card from now on"],
    "invoice_request": ["send me an invoice for {order}", "i need a receipt for my {product}",
                        "can i get a vat invoice for the order on {date}", "download invoice for order {order}",
                        "where can i find my receipts"],
    "reset_password": ["i forgot my password", "reset my password please", "password reset email never came",
                       "can't remember my login password", "how do i change my password"],
    "account_locked": ["my account is locked", "i'm locked out after too many attempts",
                       "account suspended, please unlock it", "it says my account is disabled",
                       "unlock my account"],
    "delete_account": ["delete my account", "please close my account and remove my data",
                       "how do i permanently delete my profile", "i want all my data erased",
                       "remove my account entirely"],
    "change_email": ["change the email on my account", "update my email address to a new one",
                     "i no longer use that email, can you change it", "how do i switch my login email"],
    "product_availability": ["is the {product} in stock", "when will the {product} be available again",
                             "do you have the {product} in blue", "is the {product} sold out",
                             "will you restock the {product}"],
    "price_match": ["the {product} is cheaper elsewhere, can you match it", "do you price match",
                    "another store sells the {product} for {amount}", "can i get the lower price i saw online",
                    "price dropped after i bought the {product}, can i get the difference"],
    "warranty_claim": ["my {product} stopped working", "the {product} broke after a month, is it under warranty",
                       "warranty claim for my {product}", "the {product} won't turn on anymore",
                       "how do i use the warranty on order {order}"],
    "damaged_delivery": ["my {product} arrived damaged", "the box was crushed and the {product} is broken",
                         "package {order} came damaged", "received a cracked {product}",
                         "delivery arrived in pieces"],
    "wrong_item": ["i received the wrong item", "this isn't the {product} i ordered",
                   "order {order} contained someone else's item", "you sent me the wrong size",
                   "got a different {product} than the one i paid for"],
    "discount_code": ["my promo code isn't working", "the discount code {code} is invalid",
                      "how do i apply a coupon", "code {code} says expired but it shouldn't be",
                      "forgot to use my discount code on {order}"],
    "subscription_cancel": ["cancel my subscription", "stop my monthly plan", "i want to end my membership",
                            "how do i turn off auto renewal", "don't charge me for the subscription anymore"],
    "talk_to_human": ["let me talk to a human", "can i speak to an agent", "i want a real person",
                      "connect me with customer service", "is there someone i can call"],
}

# Held-out wording: used only in val and test, so neither the mined rules nor a small model
# trained on train has seen it; a pre-trained large model can still read it.
UNSEEN: dict[str, list[str]] = {
    "track_order": ["any news on when the parcel shows up", "the courier status for {order} please",
                    "i'm still waiting on my delivery, whereabouts is it"],
    "cancel_order": ["scrap the purchase i just made", "i changed my mind about {order}, call it off",
                     "please void that transaction before dispatch"],
    "return_item": ["i'd like to ship the {product} back to you", "can this go back to the warehouse",
                    "sending back the purchase, what's the process"],
    "refund_status": ["the money for the {product} i sent back hasn't landed", "still no reimbursement on my card",
                      "when does the credit for my returned parcel show up"],
    "change_address": ["i relocated last week, deliver to my new place", "the parcel should go to my office instead",
                       "my postcode on {order} is outdated"],
    "payment_failed": ["the bank refused the charge", "it keeps saying transaction unsuccessful at checkout",
                       "why won't my visa go through"],
    "update_payment_method": ["swap the card you bill me on", "i got a new visa, use that from now on",
                              "set apple pay as my default"],
    "invoice_request": ["i need the paperwork for my expense report", "a bill with the tax breakdown for {order}",
                        "accounting wants a copy of what i paid"],
    "reset_password": ["the login keeps saying wrong credentials and i don't recall them",
                       "need a new passcode, the old one is gone from my head", "how do i get back in without my pass"],
    "account_locked": ["too many tries and now it won't let me in at all", "my profile got frozen",
                       "it blocked me from signing in"],
    "delete_account": ["wipe everything you have on me", "i'm leaving for good, erase my profile",
                       "gdpr request: remove my personal information"],
    "change_email": ["my inbox address changed, please update it", "use my work mail for the login instead",
                     "swap the contact address on file"],
    "product_availability": ["can i still buy the {product} or is it gone", "any {product} left in the warehouse",
                             "when is the next batch of {product} coming in"],
    "price_match": ["a competitor lists it lower, will you honour that",
                    "i found a better deal elsewhere for the {product}",
                    "can you beat the price at the other shop"],
    "warranty_claim": ["the {product} died after six weeks", "it quit working and it's still under guarantee",
                       "defective {product}, what does the guarantee cover"],
    "damaged_delivery": ["the courier must have dropped it, it's smashed",
                         "opened the parcel and the {product} was dented",
                         "the goods came in bad shape"],
    "wrong_item": ["that's not what i picked at checkout", "the parcel had a totally different thing in it",
                   "somebody mixed up my {order}, it's not my product"],
    "discount_code": ["the voucher won't apply at checkout", "my coupon {code} gets rejected",
                      "the promotion didn't take off any money"],
    "subscription_cancel": ["end the recurring plan", "i don't want to be billed every month anymore",
                            "stop renewing my membership automatically"],
    "talk_to_human": ["put me through to a person", "i'd rather chat with somebody real",
                      "is there a phone number for support staff"],
}

PRODUCTS = ["headphones", "blender", "running shoes", "laptop sleeve", "coffee maker", "desk lamp", "phone case",
            "backpack", "smart watch", "air fryer", "winter jacket", "keyboard", "yoga mat", "vacuum cleaner"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
CHATTER = ["hi there,", "hello, hope you're well.", "good morning team,", "sorry to bother you again but",
           "i've been a customer for years and", "quick question, i was talking to my partner about this and",
           "ok so this is the third time i write,", "thanks for the help last week with something else,"]
# Long or ambiguous: another topic comes first, the request that decides the label comes last.
DISTRACTORS = {
    "return_item": "my order arrived yesterday, which was nice, but",
    "refund_status": "i already sent the item back last month and",
    "cancel_order": "i was going to ask where my package is, actually never mind,",
    "track_order": "i know you can't change the address anymore, so just tell me",
    "wrong_item": "the delivery was on time and the box was fine, however",
    "warranty_claim": "i'm not asking for a refund, the return window is over, but",
    "damaged_delivery": "i don't want to cancel or return anything yet, just to report that",
    "price_match": "i'm happy with the product and don't want a refund, only",
}


# With fields (`make_demo(extract=True)`) these join the pools: e-mail addresses to extract.
EMAIL_PHRASINGS = {"change_email": ["change my email to {email}", "please use {email} as my login from now on",
                                    "my new address is {email}, update the account"]}
EMAIL_UNSEEN = {"change_email": ["send everything to {email} instead"]}
NAMES = ["ann", "bo", "chen", "dana", "eli", "femi", "gus", "hana", "ivo", "jo", "kai", "lena", "milo", "nora"]
DOMAINS = ["mail.example.com", "example.org", "post.example.net", "inbox.example.co.uk"]
# Slot -> the field it fills (with --extract): the value is the slot without its prefix ("#").
FIELD_OF = {"order": "order_id", "email": "email", "date": "date"}


def _email(rng: random.Random) -> str:
    user = f"{rng.choice(NAMES)}{rng.choice(['.', '_', ''])}{rng.choice(NAMES)}{rng.randint(1, 99)}"
    return f"{user}@{rng.choice(DOMAINS)}"


def _slots(rng: random.Random) -> dict[str, str]:
    return {"order": rng.choice(["#", "no. ", ""]) + f"{rng.choice('ABCDEFGHJK')}{rng.randint(10000, 99999)}",
            "product": rng.choice(PRODUCTS),
            "date": rng.choice([f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
                                f"{rng.randint(1, 28)}/{rng.randint(1, 12)}", "last monday", "yesterday"]),
            "amount": rng.choice(["$", "€", ""]) + f"{rng.randint(5, 500)}" + rng.choice([".00", ".99", ""]),
            "code": rng.choice(["SAVE", "WELCOME", "SPRING", "VIP"]) + str(rng.randint(5, 50))}


def _typo(text: str, rng: random.Random, keep: frozenset[str] = frozenset()) -> str:
    """One or two typos in words of 4+ letters, never in a word of `keep` (field values)."""
    words = text.split()
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) < 4 or not w.isalpha() or w in keep:
            continue
        j = rng.randrange(1, len(w) - 1)
        op = rng.random()
        if op < 0.4:
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]  # swap
        elif op < 0.7:
            w = w[:j] + w[j + 1:]  # drop
        else:
            w = w[:j] + w[j] + w[j:]  # double
        words[i] = w
    return " ".join(words)


def generate_text(label: str, rng: random.Random, hard_share: float = 0.1, typo_share: float = 0.15,
                  unseen_share: float = 0.0) -> str:
    return generate_example(label, rng, hard_share, typo_share, unseen_share)[0]


def generate_example(label: str, rng: random.Random, hard_share: float = 0.1, typo_share: float = 0.15,
                     unseen_share: float = 0.0, extract: bool = False) -> tuple[str, dict[str, list[str]]]:
    """A text of `label` and the fields its slots filled (order ids, e-mail addresses, dates).
    Without `extract` the random draws are those of the classification-only demo, text for text."""
    import string

    unseen = rng.random() < unseen_share
    pool = (UNSEEN if unseen else INTENTS)[label]
    if extract:
        pool = pool + (EMAIL_UNSEEN if unseen else EMAIL_PHRASINGS).get(label, [])
    template = rng.choice(pool)
    slots = _slots(rng)
    if extract:
        slots["email"] = _email(rng)
    text = template.format(**slots)
    used = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    fields: dict[str, list[str]] = {}
    for name in used:
        if name in FIELD_OF:
            value = slots[name].removeprefix("#").removeprefix("no. ")
            fields.setdefault(FIELD_OF[name], []).append(value)
    keep = frozenset(w for vals in fields.values() for v in vals for w in v.split()) if extract else frozenset()
    if rng.random() < hard_share:
        prefix = DISTRACTORS.get(label) or rng.choice(CHATTER)
        text = f"{rng.choice(CHATTER)} {prefix} {text}"
    elif rng.random() < 0.3:
        text = f"{rng.choice(CHATTER)} {text}"
    if rng.random() < 0.3:
        text += rng.choice(["?", ".", "!", " thanks", " asap", " please"])
    if rng.random() < typo_share:
        text = _typo(text, rng, keep)
    if rng.random() < 0.2:  # (capitalize() would lowercase an order id: only with fields is that kept)
        text = text[0].upper() + text[1:] if extract else text.capitalize()
    return text, fields


def make_demo(out: str | Path, per_label: tuple[int, int, int] = (120, 25, 40), seed: int = 0,
              extract: bool = False) -> Path:
    """Write the demo dataset dir: `per_label` = (train, val, test) texts per intent, all distinct.
    `extract`: a joint task, each row also carrying its fields (order_id, email, date)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for split, n in zip(splits, per_label):
        for label in INTENTS:
            made = 0
            while made < n:
                text, fields = generate_example(label, rng, unseen_share=0.0 if split == "train" else 0.15,
                                                extract=extract)
                if text in seen:
                    continue
                seen.add(text)
                splits[split].append(Example(f"{split}-{len(splits[split]):05d}", text, label,
                                             fields if extract else None))
                made += 1
        rng.shuffle(splits[split])
    write_dataset(out, splits, task="joint" if extract else "classify")
    return Path(out)
