"""Lead normalisation, matching (with blocking) and enrichment: orch_project.lib.contacts.

Pure Python, no Dagster, no database, no network; the whole file runs in well under 5 s."""

from __future__ import annotations

import random
import time

import pytest

from orch_project.lib.contacts import (
    Contact,
    Index,
    Thresholds,
    company_key,
    contact_from_fields,
    enrich,
    is_disposable,
    is_free_mail,
    match,
    match_batch,
    name_key,
    normalise_email,
    normalise_phone,
    seniority,
)

DIRECTORY = {
    "acme.com": {"name": "Acme Corporation", "industry": "Manufacturing", "employees": 1200, "country": "US"},
    "globex.de": {"name": "Globex GmbH", "industry": "Software", "employees": 85, "country": "DE"},
}


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  John.Smith+newsletter@GMAIL.com ", "johnsmith@gmail.com"),
        ("j.o.h.n.smith@googlemail.com", "johnsmith@gmail.com"),
        ("John.Smith+tag@Example.COM", "john.smith+tag@example.com"),  # only Gmail ignores dots/+tags
        ("mailto:<Jane@Acme.com>", "jane@acme.com"),
        ("not an address", None),
        ("jane@", None),
        ("@acme.com", None),
        ("jane@acme", None),
        ("a@b@c.com", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_normalise_email(raw, expected):
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    "raw, region, expected",
    [
        ("+49 30 1234567", None, "+49301234567"),
        ("+1 (415) 555-2671", "DE", "+14155552671"),  # a + wins over the default region
        ("030 1234567", "DE", "+49301234567"),
        ("(415) 555-2671", "US", "+14155552671"),
        ("0044 20 7946 0958", "DE", "+442079460958"),  # international prefix of the region
        ("020 7946 0958", "uk", "+442079460958"),
        ("415 555 2671", None, None),  # no + and no region: cannot be placed
        ("123", "US", None),  # too short
        ("+1 555 000 0000", None, None),  # not a valid NANP number
        ("call me", "US", None),
        ("", "US", None),
        (None, "US", None),
    ],
)
def test_normalise_phone(raw, region, expected):
    assert normalise_phone(raw, region) == expected


def test_name_and_company_keys():
    assert name_key("  José ", "O'Brien-Núñez ") == "jose obrien nunez"
    assert name_key("SØREN", "kierkegaard") == "soren kierkegaard"
    assert name_key(None, "Smith") == "smith"
    assert name_key(None, None) == ""
    assert company_key("Müller & Co. GmbH") == "muller"
    assert company_key("ACME Pty. Ltd.") == "acme"
    assert company_key("Globex, Inc.") == "globex"
    assert company_key("Initech LLC") == company_key("initech") == "initech"
    assert company_key("Petronas Sdn. Bhd.") == "petronas"
    assert company_key("Société Générale S.A.") == "societe generale"
    assert company_key("Hooli SARL") == company_key("Hooli B.V.") == company_key("Hooli Limited") == "hooli"
    assert company_key("Umbrella Corp") == company_key("UMBRELLA  co") == "umbrella"
    assert company_key("Co-operative Bank") == "co operative bank"  # only trailing legal forms go
    assert company_key("S.A.") == "sa"  # nothing but a legal form: kept
    assert company_key(None) == ""


# ------------------------------------------------------------------------------ matching


def _contacts():
    return [
        contact_from_fields("c1", email="john.smith@acme.com", phone="+1 415 555 2671",
                            first_name="John", last_name="Smith", company="Acme Inc."),
        contact_from_fields("c2", email="maria.garcia@globex.de", first_name="Maria", last_name="Garcia",
                            company="Globex GmbH"),
        contact_from_fields("c3", email="Ann.Lee+crm@gmail.com", first_name="Ann", last_name="Lee",
                            company="Initech"),
    ]


def test_exact_email_and_phone_merge():
    index = Index(_contacts())
    m = match(contact_from_fields("L1", email="  ANNLEE@googlemail.com", first_name="A.", last_name="Lee"), index)
    assert (m.decision, m.contact_id, m.reason, m.score) == ("merge", "c3", "same e-mail address", 100.0)
    m = match(contact_from_fields("L2", phone="(415) 555-2671", default_region="US",
                                  first_name="Johnny", last_name="Smith"), index)
    assert (m.decision, m.contact_id, m.reason) == ("merge", "c1", "same phone number")


def test_shared_phone_with_a_different_name_is_uncertain():
    index = Index(_contacts())
    lead = contact_from_fields("L", phone="+14155552671", first_name="Peter", last_name="Parker", company="Acme")
    m = match(lead, index)
    assert m.decision == "uncertain" and m.contact_id == "c1" and "phone" in m.reason
    assert match(lead, index, Thresholds(guard_shared=False)).decision == "merge"
    # a role address (info@) shared by two different people: uncertain; the same person: merge
    index.add(contact_from_fields("c9", email="info@hooli.com", first_name="Ann", last_name="Lee", company="Hooli"))
    m = match(contact_from_fields("L", email="INFO@hooli.com", first_name="Bob", last_name="Stone"), index)
    assert (m.decision, m.contact_id) == ("uncertain", "c9")
    assert match(contact_from_fields("L", email="info@hooli.com", first_name="Anne", last_name="Lee"),
                 index).decision == "merge"


def test_same_lead_typed_twice_merges_by_name_and_company():
    index = Index(_contacts())
    lead = contact_from_fields("L", first_name="  JOHN ", last_name="smith  ", company="ACME, inc")
    m = match(lead, index)
    assert m.decision == "merge" and m.contact_id == "c1"
    assert "name 100" in m.reason and "company 100" in m.reason
    # a typo in the first name still merges
    m = match(contact_from_fields("L", first_name="Jon", last_name="Smith", company="Acme Incorporated"), index)
    assert m.decision == "merge" and m.contact_id == "c1"


def test_batch_leads_match_each_other():
    index = Index(_contacts())
    batch = [
        contact_from_fields("L1", email="Zoe.Quinn@Hooli.com", first_name="Zoë", last_name="Quinn", company="Hooli LLC"),
        contact_from_fields("L2", email="zoe.quinn@hooli.com ", first_name="zoe", last_name="QUINN", company="hooli"),
        contact_from_fields("L3", first_name="  Zoe  ", last_name="Quinn", company="HOOLI, L.L.C."),
        contact_from_fields("L4", email="zq@hooli.com", phone="+44 20 7946 0958", first_name="Zoe",
                            last_name="Quinn", company="Hooli"),
        contact_from_fields("L5", email="zq@hooli.com", first_name="Z", last_name="Quinn"),
    ]
    out = match_batch(batch, index)
    assert [m.decision for m in out] == ["new", "merge", "merge", "merge", "merge"]
    assert [m.contact_id for m in out[1:]] == ["L1"] * 4
    assert out[1].reason == "same e-mail address"
    assert out[2].reason.startswith("similar name and company")
    assert out[4].reason == "same e-mail address"  # zq@ was learnt from the merged lead L4


def test_grey_band_is_uncertain():
    index = Index(_contacts())
    # "marie garcia" vs "maria garcia": token_sort_ratio 91.7, between 85 and 92
    m = match(contact_from_fields("L", first_name="Marie", last_name="Garcia", company="Globex"), index)
    assert m.decision == "uncertain" and m.contact_id == "c2"
    assert "name 92" in m.reason or "name 91" in m.reason
    # the same name at a company whose name contains the other one: a person decides
    m = match(contact_from_fields("L", first_name="John", last_name="Smith", company="Acme Logistics"), index)
    assert m.decision == "uncertain" and m.contact_id == "c1" and "partial" in m.reason
    # same name, no company: uncertain, never merged on a name alone
    m = match(contact_from_fields("L", first_name="Ann", last_name="Lee"), index)
    assert m.decision == "uncertain" and m.contact_id == "c3"


def test_different_person_same_company_is_new():
    index = Index(_contacts())
    m = match(contact_from_fields("L", email="jane.smith@acme.com", first_name="Jane", last_name="Smith",
                                  company="Acme Inc."), index)
    assert (m.decision, m.contact_id) == ("new", None)
    m = match(contact_from_fields("L", first_name="Bob", last_name="Jones", company="Acme"), index)
    assert m.decision == "new"
    assert match(contact_from_fields("L"), index).decision == "new"  # nothing to compare


def test_reasons_never_contain_email_or_phone():
    index = Index(_contacts())
    leads = [
        contact_from_fields("L1", email="john.smith@acme.com"),
        contact_from_fields("L2", phone="+14155552671", first_name="John", last_name="Smith"),
        contact_from_fields("L3", phone="+14155552671", first_name="Peter", last_name="Parker"),
        contact_from_fields("L4", email="maria.garcia@globex.de", first_name="Marie", last_name="Garcia"),
    ]
    for lead in leads:
        reason = match(lead, index).reason
        for secret in ("john.smith", "acme.com", "4155552671", "415", "maria.garcia", "@"):
            assert secret not in reason, (secret, reason)
    r = enrich("john,smith@acme.com", "+1 415 555 267", None, None, None, DIRECTORY)
    for why in [*r["reasons"].values(), r["email_reason"] or ""]:
        assert "john,smith" not in why and "acme.com" not in why and "555" not in why


_FIRST = ["James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
          "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Chris", "Karen",
          "Anna", "Lukas", "Sofia", "Mateo", "Emma", "Noah", "Olivia", "Liam", "Mia", "Lucas"]
_LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
         "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
         "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
         "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Dubois", "Moreau"]
_SYLL = ["ac", "me", "glo", "bex", "ini", "tech", "hoo", "li", "um", "brel", "la", "so", "ly", "ent", "vex",
         "cor", "zen", "tri", "nova", "dyn", "qua", "ris", "pal", "mon", "tor", "ex", "ion", "sys"]


def _synthetic(n: int, seed: int = 7) -> list[Contact]:
    rng = random.Random(seed)
    companies = ["".join(rng.choice(_SYLL) for _ in range(rng.randint(2, 3))).title() + rng.choice(
        [" Inc", " GmbH", " Ltd", "", " LLC", " SA"]) for _ in range(800)]
    out = []
    for i in range(n):
        first, last, comp = rng.choice(_FIRST), rng.choice(_LAST), rng.choice(companies)
        out.append(contact_from_fields(f"c{i}", email=f"{first}.{last}{i}@{company_key(comp).replace(' ', '')}.com",
                                       first_name=first, last_name=last, company=comp))
    return out


def test_blocking_makes_matching_5000_contacts_fast():
    contacts = _synthetic(5000)
    index = Index(contacts)
    rng = random.Random(3)
    leads = []
    for j in range(2000):
        c = rng.choice(contacts)
        if j % 2:  # a retyped duplicate (case, spacing) without the e-mail: needs the fuzzy path
            leads.append(Contact(f"L{j}", None, None, "  ".join(c.name_key.split()).upper().lower(),
                                 c.company_key.upper().lower()))
        else:  # someone unseen
            leads.append(contact_from_fields(f"L{j}", first_name=rng.choice(_FIRST) + "x",
                                             last_name=rng.choice(_LAST) + "son", company="Zzz Unrelated"))
    start = time.perf_counter()
    out = [match(lead, index) for lead in leads]
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"2,000 leads against 5,000 contacts took {elapsed:.2f}s"
    # duplicates are found (merge, or uncertain when the synthetic data holds a namesake at that firm)
    assert all(m.decision != "new" for m in out[1::2])
    assert sum(m.decision == "merge" for m in out[1::2]) > 900
    assert all(m.decision == "new" for m in out[0::2])
    # blocking: a lead is compared with a small share of the contacts
    assert max(len(index.candidates(lead)) for lead in leads) < 1500


# ------------------------------------------------------------------------------ enrichment


def test_enrich_corporate_domain_from_directory_with_sources():
    r = enrich("Jane.Doe@EU.Acme.com", "+49 30 1234567", "ACME (form)", "VP of Sales", "US", DIRECTORY)
    assert r["email_valid"] is True and r["email_reason"] is None
    assert r["email_domain"] == "eu.acme.com"
    assert r["free_mail"] is False and r["disposable"] is False
    assert (r["company"], r["industry"], r["employees"], r["company_country"]) == (
        "Acme Corporation", "Manufacturing", 1200, "US")
    assert (r["phone_e164"], r["country"], r["timezone"]) == ("+49301234567", "DE", "Europe/Berlin")
    assert r["seniority"] == "vp"
    assert r["sources"] == {
        "email_valid": "email_validator", "email_domain": "email_validator", "free_mail": "free_mail_list",
        "disposable": "disposable_email_domains", "company": "directory", "industry": "directory",
        "employees": "directory", "company_country": "directory", "phone_e164": "phonenumbers",
        "country": "phonenumbers", "timezone": "phonenumbers", "seniority": "title_rules",
    }
    assert r["reasons"] == {}


def test_enrich_unknown_corporate_domain_uses_the_form_and_country_hint():
    r = enrich("max@kleinfirma.de", "030 1234567", "Kleinfirma GmbH", "Geschäftsführer", "de", DIRECTORY)
    assert r["company"] == "Kleinfirma GmbH" and r["sources"]["company"] == "form"
    assert r["industry"] is None and r["reasons"]["industry"] == "domain not in the directory"
    assert r["phone_e164"] == "+49301234567"  # parsed with the hint as default region
    assert r["country"] == "DE" and r["sources"]["country"] == "phonenumbers"
    assert r["seniority"] == "c_level"
    # no phone: country and single-zone time zone from the hint
    r = enrich("max@kleinfirma.de", None, None, None, "FR", {})
    assert (r["country"], r["timezone"]) == ("FR", "Europe/Paris")
    assert r["sources"]["country"] == r["sources"]["timezone"] == "country_hint"
    assert r["company"] is None and "no company on the form" in r["reasons"]["company"]
    # a multi-zone country from the hint alone: no time zone, with the reason
    r = enrich(None, None, None, None, "US", None)
    assert r["country"] == "US" and r["timezone"] is None and "several time zones" in r["reasons"]["timezone"]


def test_enrich_free_mail_and_disposable():
    r = enrich("someone@gmail.com", None, "Acme", None, None, DIRECTORY)
    assert r["free_mail"] is True and r["disposable"] is False
    assert r["company"] == "Acme" and r["sources"]["company"] == "form"
    r = enrich("x@mailinator.com", None, None, None, None, DIRECTORY)
    assert r["disposable"] is True and r["free_mail"] is False
    assert r["sources"]["disposable"] == "disposable_email_domains"
    for d in ("yahoo.co.uk", "hotmail.fr", "outlook.com", "live.com", "gmx.de", "yandex.ru", "web.de",
              "proton.me", "qq.com", "163.com", "icloud.com"):
        assert is_free_mail(d), d
    for d in ("acme.com", "live.example.com", "yahoo-partners.com", "", None):
        assert not is_free_mail(d), d
    assert is_disposable("sub.mailinator.com") and not is_disposable("acme.com") and not is_disposable(None)


def test_enrich_never_raises_on_bad_input():
    for args in [
        (None, None, None, None, None, None),
        ("", "", "", "", "", {}),
        ("bob@@x", "12", 5, 7, 3.4, "not a dict"),
        ("a@acme.com", "+49 30 1234567", None, None, "Germany", {"acme.com": None}),
        ("a@acme.com", object(), object(), object(), object(), {"acme.com": {"name": None}}),
    ]:
        r = enrich(*args)
        for fld, value in r.items():
            if fld in ("sources", "reasons", "email_reason"):
                continue
            assert (value is None) == (fld in r["reasons"] and fld not in r["sources"]) or fld == "seniority", fld
    r = enrich("bob@@x", "12", None, None, None, None)
    assert r["email_valid"] is False and r["email_reason"] and r["email_domain"] is None
    assert r["phone_e164"] is None and "not a valid number" in r["reasons"]["phone_e164"]
    assert enrich(None, None, None, None, "Germany", None)["reasons"]["country"].startswith("country hint")


@pytest.mark.parametrize(
    "title, level",
    [
        ("CEO", "c_level"), ("Co-Founder & CTO", "c_level"), ("Chief Revenue Officer", "c_level"),
        ("Owner", "c_level"), ("President", "c_level"), ("Managing Director", "c_level"),
        ("Geschäftsführer", "c_level"), ("Directeur Général", "c_level"),
        ("Vice President, Marketing", "vp"), ("SVP Engineering", "vp"), ("VP Sales", "vp"),
        ("Director of Finance", "director"), ("Head of Growth", "director"), ("Directeur commercial", "director"),
        ("Directora de Marketing", "director"), ("Abteilungsleiter Einkauf", "director"),
        ("Product Manager", "manager"), ("Engineering Lead", "manager"), ("Gerente de ventas", "manager"),
        ("Senior Software Engineer", "individual"), ("Data Analyst", "individual"),
        ("Marketing Specialist", "individual"), ("Associate", "individual"), ("Consultant", "individual"),
        ("Executive Assistant to the CEO", "individual"), ("Product Owner", "individual"),
        ("", "unknown"), (None, "unknown"), ("Wizard", "unknown"),
    ],
)
def test_seniority(title, level):
    got, why = seniority(title)
    assert got == level
    assert (why is None) == (level != "unknown")


def test_enrichment_speed():
    rng = random.Random(1)
    rows = [(f"user{i}@{rng.choice(['acme.com', 'gmail.com', 'mailinator.com', 'firm.de'])}",
             rng.choice(["+49 30 1234567", "(415) 555-2671", "", "12"]), "Firm", rng.choice(["CEO", "Engineer", "x"]),
             rng.choice(["US", "DE", None]), DIRECTORY) for i in range(2000)]
    start = time.perf_counter()
    for row in rows:
        enrich(*row)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"2,000 enrichments took {elapsed:.2f}s"
