"""Seeded generator for a labelled PII sample: customer-service texts with exact gold spans.

Each record is ``{"id", "text", "known_names", "spans": [{"entity_type", "start", "end"}]}`` with
Presidio entity names: PERSON, EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, US_SSN,
IP_ADDRESS, LOCATION. ``known_names`` is what a caller would pass to ``pii.detect`` (the sender's
name from the header or form), empty where the sender is unknown (anonymous chat).

The sample is built to measure recall honestly, not to flatter the detector:

- names come from many Faker locales (German, French, Spanish, Italian, Polish, Turkish, Dutch,
  Brazilian, Yoruba, Indian, Indonesian, Swahili, and a few in Cyrillic, Chinese and Arabic script);
- some texts mention other people ("my husband Kwame Mensah sent ..."), never passed as known names;
- phone numbers are Faker's per-locale formats (random digits, often not valid numbers) and the
  fictional ranges the generated flow samples use;
- addresses are Faker street addresses from six locales with city and postcode;
- texts also carry look-alikes that are NOT PII (Luhn-invalid card numbers, IBANs with a wrong check,
  order numbers, dates, amounts, version strings) so precision means something.

Core sentences come from the BANKING77 training queries, read from the data directory
(``$ORCH_DATA_DIR/banking77/train.csv``, see ``orch_project.lib.datasets``; ``DatasetMissing`` when
absent); the fake card numbers, IBANs, SSNs, IPv4 addresses and phone numbers from
``orch_project.lib.fakedata``.
Everything is deterministic for a given seed (``random.Random`` and seeded Faker only).

CLI::

    python -m orch_project.lib.guardrails.pii_sample --out orch_project/data/pii_labelled.jsonl --n 500 --seed 11
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Sequence

from stdnum import iban as _iban

from .. import datasets
from ..fakedata import EMAIL_DOMAINS, fake_card_number, fake_iban, fake_ipv4, fake_ssn, intl_phone, slug
from .pii import ENTITIES

DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "data" / "pii_labelled.jsonl"
ADDRESS_LOCALES = ("en_GB", "en_US", "de_DE", "fr_FR", "es_ES", "it_IT")
# (locale, weight): customers of a European bank, many of them not Anglo.
NAME_LOCALES = (("en_GB", 10), ("en_US", 6), ("de_DE", 10), ("fr_FR", 10), ("es_ES", 9), ("it_IT", 9),
                ("pl_PL", 6), ("tr_TR", 6), ("nl_NL", 5), ("pt_BR", 6), ("yo_NG", 5), ("en_IN", 5),
                ("id_ID", 4), ("sw", 3), ("ru_RU", 2), ("zh_CN", 2), ("ar_AA", 2))
ENTITY_TYPES = ENTITIES  # the sample labels exactly the entity types the detector reports

_GREETINGS = ("Hi,", "Hello,", "Hello support team,", "Good morning,", "Dear Northwind Bank team,", "Hi there,")
_SIGN_OFFS = {
    "en": ("Thanks,", "Thank you,", "Best regards,", "Kind regards,", "Many thanks,", "Cheers,", "Regards,", "Best,"),
    "de": ("Mit freundlichen Grüßen", "Viele Grüße", "Danke,"),
    "fr": ("Cordialement,", "Bien à vous,", "Merci,"),
    "es": ("Saludos,", "Un saludo,", "Atentamente,"),
    "it": ("Cordiali saluti,", "Grazie,", "Distinti saluti,"),
}
_LANG = {"de_DE": "de", "fr_FR": "fr", "es_ES": "es", "it_IT": "it"}

# {x} marks where the entity goes; one entity per template.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "CREDIT_CARD": ("My card number is {x}.", "The card in question is {x}.", "card no. {x}",
                    "It was charged to {x} yesterday.", "For reference, card number: {x}"),
    "IBAN_CODE": ("The money was supposed to go to IBAN {x}.", "My account IBAN is {x}.", "Recipient IBAN: {x}",
                  "I sent it to {x} as instructed.", "please refund to {x}"),
    "US_SSN": ("My SSN is {x} if you need it for verification.", "SSN: {x}",
               "You can verify me with my social security number {x}."),
    "IP_ADDRESS": ("My app shows an error from {x}.", "The error page mentions the address {x}.",
                   "I'm logging in from {x} and it keeps failing.", "Your server at {x} refused the connection."),
    "EMAIL_ADDRESS": ("Please reply to me at {x}.", "You can reach me at {x}.", "My registered email is {x}.",
                      "Reply to {x} please.", "I changed my email to {x} last week."),
    "PHONE_NUMBER": ("Call me on {x}.", "My number is {x}.", "You can reach me at {x} after 5pm.",
                     "Phone: {x}", "I tried calling from {x}.", "text me on {x}"),
    "LOCATION": ("Please send the new card to {x}.", "I moved to {x} last month.",
                 "My address is {x}.", "The letter went to my old address, {x}."),
}
_SELF_INTROS = ("My name is {x} and I need help.", "Hi, this is {x}.", "I'm {x}, a customer since 2019.",
                "my name is {x}")
_THIRD_PARTY = ("My husband {x} made the transfer, not me.", "I sent 200 EUR to {x} and it never arrived.",
                "The agent {x} told me it would be fixed.", "Please add {x} as a beneficiary.",
                "My landlord {x} says the rent has not arrived.", "{x} from your branch called me yesterday.",
                "Can my daughter {x} use my card?")
_NEGATIVES = ("My order #48392011 has not shipped.", "I topped up 100 EUR on 12/10/2024.",
              "The app is version 3.12.1 on my phone.", "My card ending 1234 was declined twice.",
              "Reference: REF-2024-88812.", "It cost €1,250.00 in total.", "The code 123456 did not work.",
              "The payment of 49.99 GBP failed at 10:30.", "Tracking number 1Z999AA10123456784.",
              "I tried card 4111 1111 1111 1112 too.", "Is IBAN DE89 3704 0044 0532 0130 01 correct?",
              "I paid via Apple Pay 2 days ago.", "It says error 0x80070005.", "Ticket 2024-11-05-0042 is still open.",
              "I'm on an iPhone 15 Pro with iOS 17.4.1.", "The app build is 1.2.3.4 according to settings.",
              "Sort code 20-00-00 is what the form shows.", "I have 2 Visa Debit cards.", "This is Urgent.",
              "I'm Italian and live abroad now.", "It happened at 3 Park Lane Hotel in the lobby.",
              "See step 4 of the Help Centre article.", "I wrote to support at northwind dot example.",
              "The amount was 1 234 567 HUF.", "Please call me back, I am busy until 14:00.",
              "My username is anna_b@home but the login fails.", "Room 101 at the branch was closed.",
              "I got a text from 80055 about a code.")


class _Builder:
    """Concatenates text and records the exact span of every entity added."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: list[dict[str, Any]] = []
        self.length = 0

    def text(self, s: str) -> None:
        self.parts.append(s)
        self.length += len(s)

    def entity(self, entity_type: str, value: str) -> None:
        self.spans.append({"entity_type": entity_type, "start": self.length, "end": self.length + len(value)})
        self.text(value)

    def template(self, template: str, entity_type: str, value: str) -> None:
        before, _, after = template.partition("{x}")
        self.text(before)
        self.entity(entity_type, value)
        self.text(after)

    def result(self) -> tuple[str, list[dict[str, Any]]]:
        return "".join(self.parts), self.spans


def _extra_iban(rng: random.Random) -> str:
    """IBANs for countries whose BBAN has no national check python-stdnum verifies (FR, IT, PL, PT)."""
    cc, n_digits = rng.choice((("FR", 23), ("IT", 22), ("PL", 24), ("PT", 21)))
    bban = ("" if cc != "IT" else rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ")) + "".join(
        str(rng.randrange(10)) for _ in range(n_digits))
    number = cc + _iban.calc_check_digits(cc + "00" + bban) + bban
    return " ".join(number[i:i + 4] for i in range(0, len(number), 4)) if rng.random() < 0.6 else number


def _ipv6(rng: random.Random) -> str:
    groups = [f"{rng.randrange(0x10000):x}" for _ in range(rng.choice((2, 3, 6)))]
    return "2001:db8:" + (":".join(groups) if len(groups) == 6 else ":" + ":".join(groups))  # RFC 3849


class _People:
    def __init__(self, seed: int) -> None:
        from faker import Faker

        self.rng = random.Random(f"{seed}/people")
        locales = sorted({loc for loc, _ in NAME_LOCALES} | set(ADDRESS_LOCALES))
        self.fake = Faker(locales)
        self.fake.seed_instance(seed)
        self.name_locales = [loc for loc, _ in NAME_LOCALES]
        self.weights = [w for _, w in NAME_LOCALES]

    def person(self) -> dict[str, str]:
        loc = self.rng.choices(self.name_locales, weights=self.weights)[0]
        f = self.fake[loc]
        first, last = f.first_name(), f.last_name()
        fs, ls = slug(first) or "customer", slug(last) or "user"
        local = self.rng.choice((f"{fs}.{ls}", f"{fs[0]}{ls}", f"{fs}_{ls}{self.rng.randrange(10, 99)}",
                                 f"{ls}.{fs}", f"{fs}.{ls}+bank"))
        email = f"{local}@{self.rng.choice(EMAIL_DOMAINS + ('mail.example.co.uk', 'post.example.de'))}"
        if self.rng.random() < 0.1:
            email = email.upper() if self.rng.random() < 0.3 else email.capitalize()
        return {"first": first, "name": f"{first} {last}", "email": email, "locale": loc}

    def phone(self) -> str:
        if self.rng.random() < 0.4:
            return intl_phone(self.rng)
        return self.fake[self.rng.choice(ADDRESS_LOCALES)].phone_number()

    def address(self) -> str:
        loc = self.rng.choice(ADDRESS_LOCALES)
        f = self.fake[loc]
        street = f.street_address().replace("\n", ", ")
        if loc == "it_IT":  # it_IT city() depends on PYTHONHASHSEED (drawn from a set); this does not
            cap, _, rest = f.postcode_city_province().partition(", ")
            return f"{street}, {rest.rsplit(' (', 1)[0]}, {cap}"
        if self.rng.random() < 0.5:
            return f"{street}, {f.city()}, {f.postcode()}"
        return f"{street}, {f.postcode()} {f.city()}" if loc != "en_GB" else f"{street}, {f.city()} {f.postcode()}"


def _value(rng: random.Random, people: _People, entity_type: str, person: dict[str, str]) -> str:
    if entity_type == "CREDIT_CARD":
        return fake_card_number(rng)
    if entity_type == "IBAN_CODE":
        return fake_iban(rng) if rng.random() < 0.5 else _extra_iban(rng)
    if entity_type == "US_SSN":
        return fake_ssn(rng)
    if entity_type == "IP_ADDRESS":
        return fake_ipv4(rng) if rng.random() < 0.8 else _ipv6(rng)
    if entity_type == "EMAIL_ADDRESS":
        return person["email"]
    if entity_type == "PHONE_NUMBER":
        return people.phone()
    return people.address()


def _sentences(rng: random.Random, people: _People, b: _Builder, person: dict[str, str]) -> None:
    """Up to three PII sentences, a third-party mention and a look-alike, space separated."""
    kinds = rng.sample(list(_TEMPLATES), k=rng.choices((0, 1, 2, 3), weights=(20, 40, 30, 10))[0])
    extras: list[tuple[str, str, str]] = [(rng.choice(_TEMPLATES[k]), k, _value(rng, people, k, person)) for k in kinds]
    if rng.random() < 0.25:
        extras.append((rng.choice(_THIRD_PARTY), "PERSON", people.person()["name"]))
    if rng.random() < 0.35:
        extras.append((rng.choice(_NEGATIVES), "", ""))
    rng.shuffle(extras)
    for template, kind, value in extras:
        b.text(" ")
        if kind:
            b.template(template, kind, value)
        else:
            b.text(template)


def _record(rng: random.Random, people: _People, rows: Sequence[tuple[str, str]], i: int) -> dict[str, Any]:
    person = people.person()
    core = rows[rng.randrange(len(rows))][0]
    b = _Builder()
    kind = rng.choices(("email", "chat", "web_form"), weights=(50, 30, 20))[0]
    known = [person["name"]] if kind != "chat" or rng.random() < 0.4 else []
    if kind == "email":
        b.text(rng.choice(_GREETINGS) + "\n\n")
        if rng.random() < 0.2:
            b.template(rng.choice(_SELF_INTROS), "PERSON", person["name"])
            b.text(" ")
        b.text(core)
        _sentences(rng, people, b, person)
        lang = _LANG.get(person["locale"], "en") if rng.random() < 0.5 else "en"
        b.text("\n\n" + rng.choice(_SIGN_OFFS[lang]) + "\n")
        b.entity("PERSON", person["name"] if rng.random() < 0.85 else person["first"])
        if rng.random() < 0.5:
            b.text("\n")
            b.entity("PHONE_NUMBER", people.phone())
        if rng.random() < 0.25:
            b.text("\n")
            b.entity("LOCATION", people.address())
    elif kind == "chat":
        lower = rng.random() < 0.3
        if rng.random() < 0.35:
            b.template(rng.choice(("hi, this is {x}. ", "Hi, this is {x} - ", "hello, my name is {x}. ")), "PERSON",
                       person["first"] if rng.random() < 0.5 else person["name"])
        b.text(core)
        _sentences(rng, people, b, person)
        text, spans = b.result()
        if lower and len(text.lower()) == len(text):  # people type chat in lower case; spans stay put
            b = _Builder()
            b.parts, b.spans, b.length = [text.lower()], spans, len(text)
    else:
        b.text("Name: ")
        b.entity("PERSON", person["name"])
        b.text("\nEmail: ")
        b.entity("EMAIL_ADDRESS", person["email"])
        b.text("\nPhone: ")
        b.entity("PHONE_NUMBER", people.phone())
        if rng.random() < 0.4:
            b.text("\nAddress: ")
            b.entity("LOCATION", people.address())
        b.text("\nMessage: " + core)
        _sentences(rng, people, b, person)
    text, spans = b.result()
    assert len(text) == b.length
    return {"id": f"pii-{i:04d}", "text": text, "known_names": known, "spans": spans}


def generate(n: int = 500, seed: int = 11) -> list[dict[str, Any]]:
    """``n`` labelled texts; the same (n, seed) always gives the same records."""
    rng = random.Random(seed)
    people = _People(seed)
    rows = datasets.banking77_queries("train")
    return [_record(rng, people, rows, i) for i in range(1, n + 1)]


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path = DEFAULT_PATH) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the labelled PII sample.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    records = generate(args.n, args.seed)
    write_jsonl(records, args.out)
    counts = {t: sum(1 for r in records for s in r["spans"] if s["entity_type"] == t) for t in ENTITY_TYPES}
    print(f"{len(records)} texts -> {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
