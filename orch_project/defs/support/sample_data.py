"""Seeded sample-data generator for the Northwind Bank support inbox.

Produces realistic, fully fake inbound support messages (email, chat, web form)
whose core text is drawn from the BANKING77 training queries (CC BY 4.0,
Casanueva et al. 2020, arXiv:2003.04807; read from the data directory,
``$ORCH_DATA_DIR/banking77``, see ``orch_project.lib.datasets``), wrapped in
channel-specific framing and sprinkled with fake personal data (names, e-mail
addresses, phone numbers, postal addresses, and from ``orch_project.lib.fakedata``
Luhn-valid card numbers, checksum-valid IBANs, SSN-formatted numbers, IPv4
addresses) for downstream PII-masking to catch.

The shipped corpus is in ``SAMPLES_DIR`` (``orch_project/defs/support/samples``).

Everything is deterministic for a given seed: only ``random.Random(seed)``
instances and a ``Faker`` instance seeded with ``seed_instance`` are used, never
the global random state.

Canonical message shape (a contract validated elsewhere)::

    {"id": "msg-20261116-0001", "channel": "email" | "chat" | "web_form",
     "received_at": "2026-11-16T09:14:03Z",
     "sender": {"name": "...", "email": "..."},
     "subject": "..." | None,           # None for chat
     "body": "...",
     "attachments": [{"filename": ..., "content_type": ..., "size_bytes": ...}],
     "intent_hint": "card_arrival"}

CLI::

    python -m orch_project.defs.support.sample_data --out orch_project/defs/support/samples --seed 7 --n 300
"""

from __future__ import annotations

import argparse
import json
import random
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from ...lib import datasets
from ...lib.fakedata import EMAIL_DOMAINS, fake_card_number, fake_iban, fake_ipv4, fake_ssn, intl_phone, slug

__all__ = [
    "CHANNELS",
    "DEFAULT_DAYS",
    "SAMPLES_DIR",
    "SUPPORT_ADDRESS",
    "load_banking77",
    "generate_messages",
    "write_sample_corpus",
    "message_to_eml",
    "read_labelled_sample",
]

SUPPORT_ADDRESS = "support@northwind.example"
BANK_NAME = "Northwind Bank"
CHANNELS = ("email", "chat", "web_form")
CHANNEL_WEIGHTS = (50, 30, 20)
DEFAULT_DAYS = ["2026-11-16", "2026-11-17", "2026-11-18", "2026-11-19", "2026-11-20"]
LOCALES = ("en_GB", "en_US", "de_DE", "fr_FR", "es_ES", "it_IT")
MESSAGE_ID_DOMAIN = "mail.example"

SAMPLES_DIR = Path(__file__).parent / "samples"  # the shipped corpus (write_sample_corpus, seed 7, n 300)

_POOL_SIZE = 500

# Relative weight of each UTC hour of the day (business hours weighted).
_HOUR_WEIGHTS = (
    1, 1, 1, 1, 1, 1, 2, 4,        # 00-07
    9, 11, 12, 12, 10, 10, 11, 11,  # 08-15
    10, 9, 6, 5, 4, 3, 2, 1,        # 16-23
)

# --------------------------------------------------------------------------
# Text templates
# --------------------------------------------------------------------------

_EMAIL_GREETINGS = (
    "Hi,", "Hello,", "Hello support team,", "Good morning,", "Good afternoon,",
    "Dear Northwind Bank team,", "Hi there,", "Dear Sir or Madam,",
)
_EMAIL_SIGNOFFS = (
    "Thanks,", "Thank you,", "Best regards,", "Kind regards,", "Many thanks,", "Cheers,", "Regards,",
)
_CONTEXT_SENTENCES = (
    "I need this sorted today.",
    "This is the second time I'm writing about this.",
    "I've already tried restarting the app.",
    "Could someone please get back to me soon?",
    "I couldn't find the answer in the FAQ.",
    "I've been a customer for years and this has never happened before.",
    "Please let me know what information you need from me.",
    "I'm travelling at the moment, so email is best.",
    "Your chatbot couldn't help me with this.",
    "I'd appreciate a quick response.",
    "Nothing in the app explains what is going on.",
    "My partner had the same problem last month.",
)
_PRIORITY_SENTENCES = (
    "This is urgent.",
    "URGENT - please help ASAP.",
    "Please treat this as urgent.",
    "I need help ASAP.",
    "This is really urgent, I have bills to pay.",
    "Please respond ASAP, this is time-sensitive.",
)
_CARD_SENTENCES = (
    "My card number is {card}.",
    "The card in question is {card}.",
    "It's the card {card} if that helps.",
    "card no. {card}",
    "For reference, card number: {card}",
)
_IBAN_SENTENCES = (
    "The money was supposed to go to IBAN {iban}.",
    "My account IBAN is {iban}.",
    "Recipient IBAN: {iban}",
    "I sent it to {iban} as instructed.",
)
_SSN_SENTENCES = (
    "My SSN is {ssn} if you need it for verification.",
    "SSN: {ssn}",
    "You can verify me with my social security number {ssn}.",
)
_IP_SENTENCES = (
    "My app shows an error from {ip}.",
    "The error page mentions the address {ip}.",
    "I'm logging in from {ip} and it keeps failing.",
    "The app says connection refused from {ip}.",
)
_EMAIL_AGAIN_SENTENCES = (
    "Please reply to me at {email}.",
    "You can reach me at {email}.",
    "My registered email is {email}.",
    "Reply to {email} please.",
)
_CHAT_OPENERS = ("hi, this is {first}.", "hi, this is {first}", "Hi, this is {first} -", "hi this is {first},")

_ATTACHMENTS_GENERIC = (
    ("statement.pdf", "application/pdf"),
    ("screenshot.png", "image/png"),
    ("receipt.jpg", "image/jpeg"),
    ("Screenshot_2026-11-14.png", "image/png"),
    ("bank_statement_october.pdf", "application/pdf"),
    ("transfer_confirmation.pdf", "application/pdf"),
    ("error.png", "image/png"),
)
_ATTACHMENTS_IDENTITY = (
    ("passport_scan.jpg", "image/jpeg"),
    ("id_card_front.jpg", "image/jpeg"),
    ("proof_of_address.pdf", "application/pdf"),
    ("payslip.pdf", "application/pdf"),
)
_IDENTITY_INTENTS = frozenset({
    "verify_my_identity", "unable_to_verify_identity", "why_verify_identity",
    "verify_source_of_funds", "edit_personal_details",
})

# Short e-mail / web-form subjects per BANKING77 intent.
_SUBJECTS: dict[str, tuple[str, ...]] = {
    "Refund_not_showing_up": ("Refund not showing up", "Where is my refund?", "Refund still missing"),
    "activate_my_card": ("Card activation", "How do I activate my card?", "Can't activate new card"),
    "age_limit": ("Age requirement question", "Minimum age for an account?"),
    "apple_pay_or_google_pay": ("Apple Pay / Google Pay", "Adding card to Google Pay", "Apple Pay question"),
    "atm_support": ("ATM question", "Which ATMs can I use?"),
    "automatic_top_up": ("Auto top-up", "Automatic top-up setup"),
    "balance_not_updated_after_bank_transfer": ("Balance not updated after transfer", "Transfer not in my balance"),
    "balance_not_updated_after_cheque_or_cash_deposit": ("Deposit not showing", "Cheque deposit missing from balance"),
    "beneficiary_not_allowed": ("Can't add beneficiary", "Beneficiary not allowed"),
    "cancel_transfer": ("Cancel a transfer", "Please cancel my transfer"),
    "card_about_to_expire": ("Card expiring soon", "Replacement for expiring card"),
    "card_acceptance": ("Where is my card accepted?", "Card acceptance question"),
    "card_arrival": ("Card still not here", "Where is my card?", "New card hasn't arrived"),
    "card_delivery_estimate": ("Card delivery time", "When will my card arrive?"),
    "card_linking": ("Linking my card", "Can't link card to the app"),
    "card_not_working": ("Card not working", "My card stopped working"),
    "card_payment_fee_charged": ("Fee on card payment", "Unexpected card payment fee"),
    "card_payment_not_recognised": ("Payment I don't recognise", "Unknown card payment"),
    "card_payment_wrong_exchange_rate": ("Wrong exchange rate on payment", "Exchange rate on card payment"),
    "card_swallowed": ("ATM kept my card", "Card swallowed by ATM"),
    "cash_withdrawal_charge": ("Charged for cash withdrawal", "ATM withdrawal fee"),
    "cash_withdrawal_not_recognised": ("Cash withdrawal I didn't make", "Unknown ATM withdrawal"),
    "change_pin": ("Change my PIN", "How do I change my PIN?"),
    "compromised_card": ("Card compromised", "I think my card was hacked"),
    "contactless_not_working": ("Contactless not working", "Contactless payments failing"),
    "country_support": ("Supported countries", "Can I use the account abroad?"),
    "declined_card_payment": ("Card payment declined", "Why was my payment declined?"),
    "declined_cash_withdrawal": ("ATM withdrawal declined", "Cash withdrawal declined"),
    "declined_transfer": ("Transfer declined", "My transfer was declined"),
    "direct_debit_payment_not_recognised": ("Unknown direct debit", "Direct debit I don't recognise"),
    "disposable_card_limits": ("Disposable card limits", "Limits on disposable cards"),
    "edit_personal_details": ("Update my details", "Change of personal details"),
    "exchange_charge": ("Currency exchange fee", "Charged for exchange"),
    "exchange_rate": ("Exchange rate question", "What exchange rate do you use?"),
    "exchange_via_app": ("Exchanging currency in the app", "Currency exchange in app"),
    "extra_charge_on_statement": ("Extra charge on statement", "Unexpected charge on my statement"),
    "failed_transfer": ("Transfer failed", "My transfer didn't go through"),
    "fiat_currency_support": ("Supported currencies", "Which currencies can I hold?"),
    "get_disposable_virtual_card": ("Disposable virtual card", "How to get a disposable card"),
    "get_physical_card": ("Physical card", "Getting a physical card"),
    "getting_spare_card": ("Spare card", "Can I get a second card?"),
    "getting_virtual_card": ("Virtual card", "How do I get a virtual card?"),
    "lost_or_stolen_card": ("Lost card", "My card was stolen"),
    "lost_or_stolen_phone": ("Lost my phone", "Phone stolen - account access"),
    "order_physical_card": ("Order a physical card", "Ordering a card"),
    "passcode_forgotten": ("Forgot my passcode", "Passcode reset"),
    "pending_card_payment": ("Card payment pending", "Payment still pending"),
    "pending_cash_withdrawal": ("Pending cash withdrawal", "Withdrawal still pending"),
    "pending_top_up": ("Top-up pending", "Top-up still pending"),
    "pending_transfer": ("Transfer pending", "Transfer still pending"),
    "pin_blocked": ("PIN blocked", "My PIN is blocked"),
    "receiving_money": ("Receiving money", "How do I receive a payment?"),
    "request_refund": ("Refund request", "I'd like a refund"),
    "reverted_card_payment?": ("Card payment reverted", "Payment was reversed"),
    "supported_cards_and_currencies": ("Supported cards", "Which cards do you support?"),
    "terminate_account": ("Close my account", "Account closure"),
    "top_up_by_bank_transfer_charge": ("Fee for top-up by transfer", "Charged for bank transfer top-up"),
    "top_up_by_card_charge": ("Card top-up fee", "Charged for topping up by card"),
    "top_up_by_cash_or_cheque": ("Top up with cash or cheque", "Cash top-up"),
    "top_up_failed": ("Top-up failed", "Couldn't top up"),
    "top_up_limits": ("Top-up limits", "Maximum top-up amount"),
    "top_up_reverted": ("Top-up reverted", "My top-up was reversed"),
    "topping_up_by_card": ("Topping up by card", "Top up with my card"),
    "transaction_charged_twice": ("Charged twice", "Duplicate transaction"),
    "transfer_fee_charged": ("Transfer fee", "Charged a fee for my transfer"),
    "transfer_into_account": ("Transfer into my account", "Moving money into my account"),
    "transfer_not_received_by_recipient": ("Transfer not received", "Recipient hasn't got my transfer"),
    "transfer_timing": ("Transfer timing", "How long do transfers take?"),
    "unable_to_verify_identity": ("Can't verify my identity", "Identity verification failing"),
    "verify_my_identity": ("Identity verification", "Verifying my identity"),
    "verify_source_of_funds": ("Source of funds", "Source of funds request"),
    "verify_top_up": ("Top-up verification", "Verify my top-up"),
    "virtual_card_not_working": ("Virtual card not working", "Virtual card declined"),
    "visa_or_mastercard": ("Visa or Mastercard?", "Card network question"),
    "why_verify_identity": ("Why verify my identity?", "Question about verification"),
    "wrong_amount_of_cash_received": ("Wrong amount from ATM", "ATM gave me the wrong amount"),
    "wrong_exchange_rate_for_cash_withdrawal": ("Wrong rate on ATM withdrawal", "Exchange rate on cash withdrawal"),
}

# --- CSAT -----------------------------------------------------------------

_CSAT_LOW_INTENTS = frozenset({
    "Refund_not_showing_up", "request_refund", "failed_transfer", "declined_transfer",
    "pending_transfer", "transfer_not_received_by_recipient", "cancel_transfer",
    "balance_not_updated_after_bank_transfer", "balance_not_updated_after_cheque_or_cash_deposit",
    "unable_to_verify_identity", "verify_my_identity", "why_verify_identity", "verify_source_of_funds",
    "transaction_charged_twice", "compromised_card", "card_swallowed", "wrong_amount_of_cash_received",
    "cash_withdrawal_not_recognised", "card_payment_not_recognised", "direct_debit_payment_not_recognised",
    "extra_charge_on_statement", "top_up_failed", "top_up_reverted", "beneficiary_not_allowed",
    "lost_or_stolen_card", "lost_or_stolen_phone", "card_arrival",
})
_CSAT_HIGH_INTENTS = frozenset({
    "age_limit", "atm_support", "country_support", "fiat_currency_support", "supported_cards_and_currencies",
    "visa_or_mastercard", "exchange_rate", "exchange_via_app", "card_acceptance", "card_delivery_estimate",
    "top_up_limits", "disposable_card_limits", "getting_virtual_card", "get_disposable_virtual_card",
    "getting_spare_card", "order_physical_card", "get_physical_card", "change_pin", "activate_my_card",
    "apple_pay_or_google_pay", "automatic_top_up", "receiving_money", "transfer_timing",
    "top_up_by_cash_or_cheque", "topping_up_by_card", "transfer_into_account", "card_linking",
})
_CSAT_WEIGHTS = {  # weights for scores 1..5
    "low": (26, 24, 22, 16, 12),
    "neutral": (8, 12, 24, 30, 26),
    "high": (3, 5, 12, 30, 50),
}
_CSAT_COMMENTS = {
    1: ("Still not resolved.", "Nobody actually answered my question.", "Very slow and unhelpful.",
        "I had to write three times.", "Terrible experience, considering closing my account."),
    2: ("Took far too long.", "The answer was generic.", "Partly helpful, but the issue is still open.",
        "Had to repeat myself.", "Slow response."),
    3: ("OK, but it took a while.", "Fine.", "Got an answer eventually.", "Average service.",
        "Resolved, but the process was confusing."),
    4: ("Helpful, thanks.", "Quick and clear answer.", "Good service overall.", "Sorted, thank you.",
        "Friendly agent."),
    5: ("Excellent, solved in minutes!", "Super helpful, thank you!", "Perfect, exactly what I needed.",
        "Great support.", "Fast and friendly, thanks!"),
}

# --------------------------------------------------------------------------
# BANKING77 (from the data directory, see orch_project.lib.datasets)
# --------------------------------------------------------------------------


def load_banking77(path: Path | None = None) -> list[tuple[str, str]]:
    """Return ``(text, intent)`` rows from the BANKING77 ``train.csv`` (columns ``text,category``).

    Read from ``$ORCH_DATA_DIR/banking77/train.csv`` (``orch_project.lib.datasets``; raises
    ``DatasetMissing`` when it is not there) unless ``path`` names a CSV. Text whitespace is
    normalised (the source has a few stray leading newlines); rows with empty text or category are
    skipped. Intent labels are returned verbatim (including the dataset's own spellings such as
    ``Refund_not_showing_up``).
    """
    return datasets.banking77_queries("train", path)


def _build_people(rng: random.Random, seed: int) -> list[dict[str, str]]:
    from faker import Faker

    fake = Faker(list(LOCALES))
    fake.seed_instance(seed)
    people: list[dict[str, str]] = []
    seen_emails: set[str] = set()
    for _ in range(_POOL_SIZE):
        loc = rng.choice(LOCALES)
        f = fake[loc]  # explicit locale: the proxy's own locale pick would use global random state
        first = f.first_name()
        last = f.last_name()
        fs, ls = slug(first) or "customer", slug(last) or "user"
        style = rng.randrange(6)
        if style == 0:
            local = f"{fs}.{ls}"
        elif style == 1:
            local = f"{fs}.{ls}{rng.randrange(1, 100)}"
        elif style == 2:
            local = f"{fs[0]}{ls}"
        elif style == 3:
            local = f"{fs}_{ls}"
        elif style == 4:
            local = f"{fs}{ls}{rng.randrange(60, 100)}"
        else:
            local = f"{ls}.{fs}"
        domain = rng.choice(EMAIL_DOMAINS)
        email = f"{local}@{domain}"
        while email in seen_emails:
            email = f"{local}{rng.randrange(100, 1000)}@{domain}"
        seen_emails.add(email)
        phone = intl_phone(rng) if rng.random() < 0.3 else f.phone_number()
        street = f.street_address().replace("\n", ", ")
        if loc == "it_IT":
            # it_IT city() samples from a list built from a set (order depends on PYTHONHASHSEED);
            # postcode_city_province() draws from an ordered dict and is deterministic.
            cap, _, rest = f.postcode_city_province().partition(", ")
            address = f"{street}, {rest.rsplit(' (', 1)[0]}, {cap}"
        else:
            address = f"{street}, {f.city()}, {f.postcode()}"
        people.append({"first": first, "name": f"{first} {last}", "email": email,
                       "phone": phone, "address": address, "locale": loc})
    return people


# --------------------------------------------------------------------------
# Message generation
# --------------------------------------------------------------------------


def _parse_days(days: Sequence[str] | None) -> list[date]:
    ds = list(days) if days else list(DEFAULT_DAYS)
    return [date.fromisoformat(d) for d in ds]


def _iso_z(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso_z(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _core_text(rng: random.Random, text: str, person: dict[str, str]) -> tuple[str, bool]:
    """Return (core text with extra sentences and sprinkled PII, is_priority)."""
    parts = [text if text[-1:] in ".?!" else text + rng.choice(("", ".", "?"))]
    if rng.random() < 0.30:
        parts.append(rng.choice(_CONTEXT_SENTENCES))
    if rng.random() < 0.05:
        parts.append(rng.choice(_CARD_SENTENCES).format(card=fake_card_number(rng)))
    if rng.random() < 0.03:
        parts.append(rng.choice(_IBAN_SENTENCES).format(iban=fake_iban(rng)))
    if rng.random() < 0.03:
        parts.append(rng.choice(_SSN_SENTENCES).format(ssn=fake_ssn(rng)))
    if rng.random() < 0.02:
        parts.append(rng.choice(_IP_SENTENCES).format(ip=fake_ipv4(rng)))
    if rng.random() < 0.05:
        parts.append(rng.choice(_EMAIL_AGAIN_SENTENCES).format(email=person["email"]))
    priority = rng.random() < 0.08
    if priority:
        sentence = rng.choice(_PRIORITY_SENTENCES)
        if rng.random() < 0.5:
            parts.insert(0, sentence)
        else:
            parts.append(sentence)
    return " ".join(parts), priority


def _subject(rng: random.Random, intent: str, priority: bool) -> str:
    options = _SUBJECTS.get(intent) or (intent.rstrip("?").replace("_", " ").capitalize(),)
    subj = rng.choice(options)
    if priority and rng.random() < 0.6:
        subj = rng.choice(("URGENT: ", "Urgent - ", "ASAP: ")) + subj
    elif rng.random() < 0.07:
        subj = "Re: " + subj
    return subj


def _attachment(rng: random.Random, intent: str) -> dict[str, Any]:
    pool = _ATTACHMENTS_IDENTITY if intent in _IDENTITY_INTENTS and rng.random() < 0.7 else _ATTACHMENTS_GENERIC
    filename, ctype = rng.choice(pool)
    return {"filename": filename, "content_type": ctype, "size_bytes": rng.randrange(18_000, 2_400_000)}


def generate_messages(
    n: int,
    *,
    seed: int = 7,
    days: list[str] | None = None,
    banking_rows: Sequence[tuple[str, str]] | None = None,
    id_prefix: str = "msg",
) -> list[dict]:
    """Generate ``n`` inbound support messages in the canonical JSON shape.

    Deterministic for a given (n, seed, days, banking_rows, id_prefix). Messages are
    returned in chronological order; ids are ``f"{id_prefix}-{YYYYMMDD}-{seq:04d}"``
    with ``seq`` counting from 1 within each day.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    rows = list(banking_rows) if banking_rows is not None else load_banking77()
    if not rows:
        raise ValueError("banking_rows is empty")
    day_list = _parse_days(days)
    people = _build_people(rng, seed)
    hours = range(24)

    drafts: list[tuple[datetime, int, dict]] = []
    for i in range(n):
        channel = rng.choices(CHANNELS, weights=CHANNEL_WEIGHTS)[0]
        day = rng.choice(day_list)
        hour = rng.choices(hours, weights=_HOUR_WEIGHTS)[0]
        received = datetime(day.year, day.month, day.day, hour, rng.randrange(60), rng.randrange(60),
                            tzinfo=timezone.utc)
        person = rng.choice(people)
        text, intent = rows[rng.randrange(len(rows))]
        core, priority = _core_text(rng, text, person)

        if channel == "email":
            lines = [rng.choice(_EMAIL_GREETINGS), "", core, "", rng.choice(_EMAIL_SIGNOFFS), person["name"]]
            if rng.random() < 0.50:
                lines.append(person["phone"])
            if rng.random() < 0.15:
                lines.append(person["address"])
            body = "\n".join(lines)
            subject = _subject(rng, intent, priority)
            attachments = [_attachment(rng, intent)] if rng.random() < 0.10 else []
        elif channel == "chat":
            body = core
            if rng.random() < 0.35:
                body = body.lower()
            if rng.random() < 0.20:
                body = rng.choice(_CHAT_OPENERS).format(first=person["first"]) + " " + body
            subject = None
            attachments = []
        else:  # web_form
            body = (f"Name: {person['name']}\nEmail: {person['email']}\n"
                    f"Phone: {person['phone']}\nMessage: {core}")
            subject = _subject(rng, intent, priority)
            attachments = []

        msg = {
            "id": "",
            "channel": channel,
            "received_at": _iso_z(received),
            "sender": {"name": person["name"], "email": person["email"]},
            "subject": subject,
            "body": body,
            "attachments": attachments,
            "intent_hint": intent,
        }
        drafts.append((received, i, msg))

    drafts.sort(key=lambda t: (t[0], t[1]))
    per_day: dict[str, int] = {}
    out: list[dict] = []
    for received, _, msg in drafts:
        key = received.strftime("%Y%m%d")
        per_day[key] = per_day.get(key, 0) + 1
        msg["id"] = f"{id_prefix}-{key}-{per_day[key]:04d}"
        out.append(msg)
    return out


# --------------------------------------------------------------------------
# E-mail rendering
# --------------------------------------------------------------------------


def _attachment_payload(msg_id: str, att: dict[str, Any]) -> bytes:
    """A small deterministic stand-in payload whose magic bytes match the content type."""
    r = random.Random(f"{msg_id}/{att.get('filename')}")
    ctype = att.get("content_type", "application/octet-stream")
    if ctype == "application/pdf":
        head = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
                b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n% sample placeholder\n")
        tail = b"\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    elif ctype == "image/png":
        head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"
        tail = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    elif ctype == "image/jpeg":
        head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        tail = b"\xff\xd9"
    else:
        head, tail = b"", b""
    filler = r.randbytes(max(0, 320 - len(head) - len(tail)))
    return head + filler + tail


def message_to_eml(msg: dict) -> bytes:
    """Render a canonical message as RFC 5322 bytes.

    Lines end in LF (the usual on-disk .eml / Maildir convention; Python's parser then
    returns the body without CR characters).

    Headers: Message-ID ``<ID@mail.example>``, Date (from received_at), From
    (``Name <address>``), To (the support address), Subject. Body is text/plain
    UTF-8; messages with attachments become multipart/mixed with small generated
    payloads. The MIME boundary is derived from the id, so output is deterministic.
    """
    from email import policy
    from email.headerregistry import Address
    from email.message import EmailMessage
    from email.utils import format_datetime

    em = EmailMessage(policy=policy.default)
    em["Message-ID"] = f"<{msg['id']}@{MESSAGE_ID_DOMAIN}>"
    em["Date"] = format_datetime(_parse_iso_z(msg["received_at"]))
    sender = msg.get("sender") or {}
    addr = sender.get("email", "")
    if "@" in addr:
        local, domain = addr.split("@", 1)
        em["From"] = Address(display_name=sender.get("name", ""), username=local, domain=domain)
    else:
        em["From"] = addr
    em["To"] = SUPPORT_ADDRESS
    em["Subject"] = msg.get("subject") or ""
    body = msg.get("body", "")
    # 7bit/8bit keeps the raw .eml human-readable (bodies are far below the 998-octet line limit).
    em.set_content(body, subtype="plain", charset="utf-8", cte="7bit" if body.isascii() else "8bit")
    attachments = msg.get("attachments") or []
    for att in attachments:
        maintype, _, subtype = att.get("content_type", "application/octet-stream").partition("/")
        em.add_attachment(_attachment_payload(msg["id"], att), maintype=maintype,
                          subtype=subtype or "octet-stream", filename=att.get("filename", "attachment.bin"))
    if attachments:
        for part in em.iter_attachments():
            del part["MIME-Version"]  # add_attachment() repeats it on sub-parts; it belongs on the top level only
        em.set_boundary("=_nwb_" + re.sub(r"[^A-Za-z0-9]", "", msg["id"]) + "_boundary")
    return em.as_bytes()


# --------------------------------------------------------------------------
# Corpus writer
# --------------------------------------------------------------------------


def _json_text(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=indent)


def _csat_responses(messages: Iterable[dict], seed: int) -> list[dict]:
    rng = random.Random(f"{seed}/csat")
    out = []
    for m in messages:
        if rng.random() >= 0.60:
            continue
        intent = m.get("intent_hint", "")
        bucket = "low" if intent in _CSAT_LOW_INTENTS else "high" if intent in _CSAT_HIGH_INTENTS else "neutral"
        score = rng.choices((1, 2, 3, 4, 5), weights=_CSAT_WEIGHTS[bucket])[0]
        delay = timedelta(seconds=rng.randrange(3600, 48 * 3600 + 1))
        out.append({
            "message_id": m["id"],
            "score": score,
            "comment": rng.choice(_CSAT_COMMENTS[score]),
            "responded_at": _iso_z(_parse_iso_z(m["received_at"]) + delay),
        })
    return out


def _write_malformed(mdir: Path, seed: int, days: list[str]) -> int:
    rng = random.Random(f"{seed}/malformed")
    base = generate_messages(4, seed=seed + 1, days=days, id_prefix="bad")
    mdir.mkdir(parents=True, exist_ok=True)

    (mdir / "empty.json").write_bytes(b"")

    blob = bytearray(rng.randbytes(512))
    for pos in rng.sample(range(512), 8):
        blob[pos] = 0
    (mdir / "binary.eml").write_bytes(bytes(blob))

    placeholder = "@@INVALID_UTF8@@"
    bad_utf8 = dict(base[0], body=base[0]["body"] + " " + placeholder)
    raw = (_json_text(bad_utf8) + "\n").encode("utf-8").replace(placeholder.encode(), b"\xff\xfe\xfa")
    (mdir / "invalid_utf8.json").write_bytes(raw)

    (mdir / "missing_fields.json").write_text(
        _json_text({"id": base[2]["id"], "channel": "email"}) + "\n", encoding="utf-8")

    fax = dict(base[1], channel="fax")
    if fax["subject"] is None:  # keep everything except the channel well-formed
        fax["subject"] = _SUBJECTS.get(fax["intent_hint"], ("Enquiry",))[0]
    (mdir / "bad_channel.json").write_text(_json_text(fax) + "\n", encoding="utf-8")

    (mdir / "not_json.json").write_bytes(b"this is not json {")

    full = message_to_eml(dict(base[3], attachments=[]))
    header_lines = [ln for ln in full.split(b"\n\n", 1)[0].split(b"\n") if not ln.startswith(b"From:")]
    kept = b"\n".join(header_lines)
    cut = kept.rfind(b"Subject:")
    truncated = kept[: cut + len(b"Subject: ") + 7] if cut >= 0 else kept[: len(kept) * 2 // 3]
    (mdir / "truncated.eml").write_bytes(truncated)
    return 7


def _readme(seed: int, n: int, days: list[str], messages: list[dict], n_inbox: int,
            counts: dict[str, int]) -> str:
    channels = {c: 0 for c in CHANNELS}
    per_day: dict[str, dict[str, int]] = {d: {c: 0 for c in CHANNELS} for d in days}
    for m in messages:
        channels[m["channel"]] += 1
        per_day.setdefault(m["received_at"][:10], {c: 0 for c in CHANNELS})[m["channel"]] += 1
    rows = "\n".join(
        f"| {d} | {v['email']} | {v['chat']} | {v['web_form']} | {sum(v.values())} |" for d, v in per_day.items()
    )
    return f"""# Northwind Bank support sample corpus

Synthetic inbound customer-support traffic for the fictional digital bank **{BANK_NAME}**
(support address `{SUPPORT_ADDRESS}`), used for local development, demos and tests of the
support-orchestration pipeline. **All personal data in this corpus is fake** (generated with
Faker and seeded random numbers); e-mail addresses use only reserved example domains, IP addresses
are from the RFC 5737 documentation ranges, and card numbers / IBANs / SSN-formatted numbers are
random values that merely pass their checksums so that PII masking has something to catch.

## How it was generated

```
python -m orch_project.defs.support.sample_data --out orch_project/defs/support/samples --seed {seed} --n {n}
```

- Generator: `orch_project/defs/support/sample_data.py` (`write_sample_corpus`), seed **{seed}**, {n} messages.
- Deterministic: the same command produces a byte-identical tree.
- Days (UTC): {days[0]} .. {days[-1]}, business-hours weighted.
- Message bodies draw on the **BANKING77** training queries (`$ORCH_DATA_DIR/banking77/train.csv`,
  outside the repository; see `orch_project/lib/datasets.py`), CC BY 4.0, Casanueva et al. 2020,
  "Efficient Intent Detection with Dual Sentence Encoders", arXiv:2003.04807. The source intent is
  kept in each message's `intent_hint` field (ground truth for evaluation; consumers may ignore it).

## Layout

| Path | Contents |
|---|---|
| `inbox/` | first {n_inbox} messages in time order: `<id>.eml` for e-mail ({counts['inbox_eml']}), `<id>.json` for chat and web form ({counts['inbox_json']}) |
| `inbox_table.jsonl` | remaining {counts['inbox_table']} messages, one canonical JSON object per line (for the inbox-table importer) |
| `malformed/` | {counts['malformed']} deliberately broken files for dead-letter demos (see below) |
| `csat_responses.jsonl` | {counts['csat_responses']} customer-satisfaction answers (`message_id`, `score` 1-5, `comment`, `responded_at`) |

Canonical message JSON: `id` (`msg-YYYYMMDD-NNNN`), `channel` (`email` / `chat` / `web_form`),
`received_at` (ISO 8601 UTC, `Z`), `sender` {{`name`, `email`}}, `subject` (null for chat), `body`,
`attachments` [{{`filename`, `content_type`, `size_bytes`}}], `intent_hint`.
In `.eml` files attachments carry small placeholder payloads (a few hundred bytes); `size_bytes` is the
nominal size from the metadata.

## Counts

By channel: email {channels['email']}, chat {channels['chat']}, web_form {channels['web_form']} (total {len(messages)}).

| Day | email | chat | web_form | total |
|---|---|---|---|---|
{rows}

## Malformed files (`malformed/`)

- `empty.json` - 0 bytes.
- `binary.eml` - 512 random bytes including NUL bytes.
- `invalid_utf8.json` - a JSON message whose body contains the raw bytes `FF FE FA`.
- `missing_fields.json` - valid JSON with only `id` and `channel`.
- `bad_channel.json` - a complete message with channel `fax`.
- `not_json.json` - the text `this is not json {{`.
- `truncated.eml` - headers cut off mid-line, no body, no `From` header.

Ids in malformed files use the prefix `bad-`.

CSAT scores are correlated with intent: transfer, refund, identity-verification and
unrecognised-transaction intents skew low; informational questions skew high.
"""


def write_sample_corpus(out_dir: Path, *, seed: int = 7, n: int = 300) -> dict:
    """Write the shipped sample corpus into ``out_dir`` and return counts by kind.

    The first two thirds of the (chronologically ordered) messages go to ``inbox/``
    (200 of 300), the rest to ``inbox_table.jsonl``. Stale ``*.eml``/``*.json`` files
    in ``inbox/`` are removed first so reruns with a different ``n`` stay consistent.
    """
    out = Path(out_dir)
    days = list(DEFAULT_DAYS)
    messages = generate_messages(n, seed=seed, days=days)
    n_inbox = (2 * n) // 3
    inbox_msgs, table_msgs = messages[:n_inbox], messages[n_inbox:]

    inbox = out / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for stale in sorted(inbox.iterdir()):
        if stale.is_file() and stale.suffix in (".eml", ".json"):
            stale.unlink()
    n_eml = n_json = 0
    for m in inbox_msgs:
        if m["channel"] == "email":
            (inbox / f"{m['id']}.eml").write_bytes(message_to_eml(m))
            n_eml += 1
        else:
            (inbox / f"{m['id']}.json").write_bytes((_json_text(m) + "\n").encode("utf-8"))
            n_json += 1

    with (out / "inbox_table.jsonl").open("wb") as fh:
        for m in table_msgs:
            fh.write((_json_text(m, indent=None) + "\n").encode("utf-8"))

    n_bad = _write_malformed(out / "malformed", seed, days)

    csat = _csat_responses(messages, seed)
    with (out / "csat_responses.jsonl").open("wb") as fh:
        for r in csat:
            fh.write((_json_text(r, indent=None) + "\n").encode("utf-8"))

    counts = {
        "messages": len(messages),
        "inbox_eml": n_eml,
        "inbox_json": n_json,
        "inbox_table": len(table_msgs),
        "malformed": n_bad,
        "csat_responses": len(csat),
    }
    for c in CHANNELS:
        counts[f"channel_{c}"] = sum(1 for m in messages if m["channel"] == c)
    (out / "README.md").write_bytes(_readme(seed, n, days, messages, n_inbox, counts).encode("utf-8"))
    return counts


# --------------------------------------------------------------------------
# Reading the shipped corpus back as labelled examples
# --------------------------------------------------------------------------

_SUBJECT_PREFIXES = ("URGENT: ", "Urgent - ", "ASAP: ", "Re: ")  # what _subject() may put in front


def intent_for_subject(subject: str | None) -> str | None:
    """The intent whose subject table holds ``subject`` (the generator draws every subject from exactly
    one intent's table, then may prefix it); None when no table holds it."""
    s = (subject or "").strip()
    for prefix in _SUBJECT_PREFIXES:
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    return _INTENT_BY_SUBJECT.get(s)


_INTENT_BY_SUBJECT = {s: intent for intent, subjects in _SUBJECTS.items() for s in subjects}


def _eml_subject_and_body(data: bytes) -> tuple[str | None, str | None]:
    from email import policy
    from email.parser import BytesParser

    try:
        msg = BytesParser(policy=policy.default).parsebytes(data)
        part = msg.get_body(preferencelist=("plain",)) if msg.is_multipart() else msg
        body = part.get_content() if part is not None else None
    except Exception:  # the email package raises a zoo of errors on garbage
        return None, None
    return str(msg.get("Subject", "")) or None, body if isinstance(body, str) else None


def read_labelled_sample(samples_dir: Path = SAMPLES_DIR) -> tuple[list[str], list[str]]:
    """Message bodies and intents of a generated corpus (by default the shipped one, ``SAMPLES_DIR``):
    ``inbox/*.json`` and ``inbox_table.jsonl`` lines carry ``intent_hint``; ``inbox/*.eml`` files carry
    none, so their intent is recovered from the subject (``intent_for_subject``, exact for this
    generator's output). ``malformed/``, unreadable files and messages without a body or an intent are
    left out. Order: inbox by file name, then the table. The triage model trains on this when BANKING77
    is not in the data directory."""
    root = Path(samples_dir)
    texts: list[str] = []
    labels: list[str] = []

    def add(body: Any, intent: Any) -> None:
        if isinstance(body, str) and body.strip() and isinstance(intent, str) and intent:
            texts.append(body.strip())
            labels.append(intent)

    inbox = root / "inbox"
    for path in sorted(inbox.iterdir()) if inbox.is_dir() else []:
        if not path.is_file():
            continue
        if path.suffix == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(obj, dict):
                add(obj.get("body"), obj.get("intent_hint"))
        elif path.suffix == ".eml":
            subject, body = _eml_subject_and_body(path.read_bytes())
            add(body, intent_for_subject(subject))
    table = root / "inbox_table.jsonl"
    if table.is_file():
        for line in table.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                add(obj.get("body"), obj.get("intent_hint"))
    return texts, labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the Northwind Bank support sample corpus.")
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args(argv)
    counts = write_sample_corpus(args.out, seed=args.seed, n=args.n)
    for k, v in counts.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
