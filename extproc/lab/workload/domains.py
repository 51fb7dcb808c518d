"""Text banks of the synthetic prompts: one :class:`Domain` per kind of application.

A domain holds a system prompt, task instructions per tier (what the gateway's router judges: the
instruction comes first in the user message), follow-up questions per tier, sentence templates for
the content (visit transcripts, customer messages, business documents), for attached reference
documents and for the assistant's own answers, and synonym pairs for paraphrases. Templates use
``{slot}`` placeholders filled from :data:`SLOTS`. The wording of the instructions follows the
gateway's routing examples (``extproc_plugins/routing/data``): small = extraction, classification,
reformatting; medium = summaries, drafts, routine explanations; large = multi-step reasoning,
calculations, in-depth analysis and synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Values of the ``{slot}`` placeholders, shared by every domain.
SLOTS: dict[str, tuple[str, ...]] = {
    "first": ("Maria", "James", "Aisha", "Daniel", "Elena", "Samuel", "Priya", "Thomas", "Grace",
              "Omar", "Hannah", "Lucas", "Mei", "Robert", "Fatima", "Noah", "Ingrid", "Carlos"),
    "last": ("Alvarez", "Okafor", "Chen", "Johansson", "Patel", "Novak", "Brennan", "Haddad",
             "Kowalski", "Moreau", "Tanaka", "Fischer", "Osei", "Reyes", "Lindqvist", "Murphy"),
    "age": tuple(str(a) for a in range(19, 88, 3)),
    "visit": ("follow-up visit", "new patient visit", "annual physical", "urgent care visit",
              "telehealth visit", "post-operative check"),
    "doctor": ("Okafor", "Lindqvist", "Haddad", "Brennan", "Tanaka", "Reyes"),
    "symptom": ("chest tightness", "shortness of breath", "a dry cough", "lower back pain",
                "headaches", "dizziness", "fatigue", "knee pain", "heartburn", "palpitations",
                "swelling in the ankles", "trouble sleeping", "a sore throat", "joint stiffness"),
    "duration": ("two days", "about a week", "three weeks", "a month", "since the spring",
                 "on and off for a year", "since the last visit", "about ten days"),
    "med": ("metformin", "lisinopril", "atorvastatin", "amlodipine", "levothyroxine",
            "omeprazole", "sertraline", "albuterol", "ibuprofen", "metoprolol", "apixaban"),
    "dose": ("5 mg", "10 mg", "20 mg", "25 mg", "40 mg", "50 mg", "500 mg", "1000 mg", "81 mg"),
    "freq": ("once a day", "twice a day", "at night", "as needed", "every morning"),
    "body": ("left knee", "lower back", "right shoulder", "chest", "abdomen", "left ankle", "neck"),
    "test": ("basic metabolic panel", "HbA1c", "lipid panel", "ECG", "chest X-ray", "thyroid panel",
             "complete blood count", "echocardiogram", "urine albumin test"),
    "regimen": ("metformin 500 mg twice a day", "lisinopril 10 mg once a day", "atorvastatin 20 mg at night",
                "amlodipine 5 mg every morning", "levothyroxine 50 mcg every morning",
                "omeprazole 20 mg before breakfast", "sertraline 50 mg once a day",
                "metoprolol 25 mg twice a day", "apixaban 5 mg twice a day", "albuterol two puffs as needed"),
    "bp": ("118/76", "132/84", "141/90", "126/80", "150/95", "122/78", "138/88"),
    "hr": ("64", "72", "78", "88", "95", "58", "81"),
    "weeks": ("two", "four", "six", "eight", "twelve"),
    "condition": ("type 2 diabetes", "hypertension", "heart failure", "asthma", "COPD",
                  "atrial fibrillation", "chronic kidney disease", "osteoarthritis", "depression"),
    "product": ("wireless headphones", "standing desk", "coffee grinder", "running shoes",
                "phone case", "air purifier", "backpack", "smart watch", "desk lamp", "blender"),
    "order": tuple(f"{n}" for n in range(480113, 480913, 37)),
    "date": ("March 3", "April 12", "May 27", "June 8", "the 21st", "September 14"),
    "plan": ("Basic plan", "Pro plan", "Family plan", "annual subscription", "Premium plan"),
    "amount": ("$19.99", "$49.00", "$129.50", "$8.75", "$240.00", "$72.30", "$1,180.00"),
    "vendor": ("Northwind Supplies", "Acme Logistics", "Blue Harbor Foods", "Kestrel Office Ltd",
               "Summit Electrical", "Greenfield Packaging", "Orion Facility Services"),
    "item": ("A4 copy paper", "toner cartridges", "pallet wrap", "safety gloves", "LED panels",
             "cleaning services", "freight charges", "laptop docks", "cable trays"),
    "qty": ("2", "5", "10", "12", "24", "40", "100", "250"),
    "price": ("3.20", "14.50", "27.00", "89.99", "112.40", "6.75", "450.00"),
    "inv": tuple(f"INV-{n}" for n in range(20417, 21417, 53)),
    "po": tuple(f"PO-{n}" for n in range(7710, 8710, 61)),
    "dept": ("Finance", "Operations", "Facilities", "Procurement", "IT", "Logistics"),
    "days": ("15", "30", "45", "60"),
    "topic": ("quarterly revenue", "customer churn", "supplier lead times", "energy use",
              "warehouse throughput", "support backlog", "hiring plans", "cloud spending"),
}


@dataclass(frozen=True)
class Domain:
    """Everything the generator needs to write one kind of application's prompts."""

    name: str
    system: str  #: default system prompt
    content_label: str  #: heading of the content in the user message
    instructions: dict[str, tuple[str, ...]]  #: tier -> task instructions (first in the message)
    followups: dict[str, tuple[str, ...]]  #: tier -> follow-up questions on the same context
    header: tuple[str, ...]  #: first line of a content block
    lead: tuple[str, ...]  #: the opening sentence after the header (the customer's issue; () for none)
    lines: tuple[tuple[str, ...], ...]  #: content sentence banks, used in rotation (e.g. doctor, patient)
    prefixes: tuple[str, ...]  #: speaker labels of the banks in ``lines`` ("" for none)
    closing: tuple[str, ...]  #: last sentence of a content block ("" allowed)
    doc_title: tuple[str, ...]  #: titles of attached reference documents
    doc_lines: tuple[str, ...]  #: sentences of reference documents
    answer_lines: tuple[str, ...]  #: sentences of the assistant's answers (history)
    synonyms: tuple[tuple[str, str], ...]  #: phrase pairs swapped both ways by a paraphrase
    paraphrase_content: bool = False  #: reword the content too (short customer messages), not only the instruction
    doc_label: str = "Reference document"
    separator: str = " "  #: between content sentences ("\n" for transcripts and line items)


_GENERIC_SYNONYMS = (
    ("Summarize", "Sum up"), ("summary", "overview"), ("Extract", "Pull out"), ("List", "Enumerate"),
    ("Classify", "Categorize"), ("brief", "short"), ("explain", "describe"), ("Explain", "Describe"),
    ("detailed", "thorough"), ("step by step", "one step at a time"), ("identify", "point out"),
    ("Identify", "Point out"), ("Write", "Draft"), ("using", "based on"), ("clear", "plain"),
    ("important", "key"), ("problem", "issue"), ("Answer this", "Respond to this"),
    ("mentioned", "stated"), ("include", "add"), ("carefully", "with care"),
)

CLINICAL = Domain(
    name="clinical",
    system=("You are a clinical documentation assistant for a primary care practice. You write accurate, "
            "concise notes from visit transcripts, never invent findings, and flag anything uncertain."),
    content_label="Visit transcript",
    instructions={
        "small": (
            "Extract every medication and dose mentioned in this visit transcript as a JSON list.",
            "Classify this visit as acute, chronic care or preventive. Answer with the label only.",
            "Pull the vital signs out of this transcript and return them as JSON.",
            "List the symptoms the patient reports in this transcript, one per line.",
            "Extract the follow-up interval and the tests ordered from this transcript.",
        ),
        "medium": (
            "Summarize this visit transcript into a SOAP note with subjective, objective, assessment and plan sections.",
            "Write a short after-visit summary for the patient in plain language from this transcript.",
            "Turn this visit transcript into a concise progress note for the chart.",
            "Draft a referral letter to the specialist summarizing this visit.",
            "Summarize the main points of this visit for the care team handoff.",
        ),
        "large": (
            "Analyze this visit transcript step by step: reason through the differential diagnosis, weigh the "
            "evidence for and against each possibility, check the plan against the attached guideline, and write "
            "a detailed assessment with a justification for every decision.",
            "Review this transcript in depth and reason rigorously about medication safety: check every drug "
            "and dose for interactions and contraindications given the history, explain the derivation of any "
            "dose adjustment, and recommend changes with justification.",
            "Synthesize a complete clinical note from this transcript and evaluate whether the workup is "
            "sufficient: reason about each risk factor, estimate the risk with explicit assumptions, and "
            "explain what is missing and why.",
            "Compare the management in this visit with the attached guideline in detail, find every gap or "
            "deviation, reason about whether each is justified, and write a long-form quality review.",
        ),
    },
    followups={
        "small": (
            "What dose of {med} did we agree on?", "When is the next appointment?",
            "Which tests were ordered?", "What was the blood pressure today?",
            "List the allergies mentioned.", "Extract the patient's current medications.",
        ),
        "medium": (
            "Rewrite the plan section in plain language for the patient.",
            "Summarize the assessment in two sentences for the referral.",
            "Draft a short message to the patient about the test results.",
            "Explain the plan to a nursing colleague in a few sentences.",
        ),
        "large": (
            "Reason step by step about whether the guideline supports starting a statin here, weighing each risk factor.",
            "Analyze whether the symptoms could be cardiac and justify the workup in detail.",
            "Evaluate the long-term risks of the current medication combination and derive a safer regimen.",
        ),
    },
    header=("{visit}, patient {first} {last}, {age} years old.",
            "Recorded {visit} with {first} {last}, age {age}, seen by Dr. {doctor}."),
    lead=(),
    lines=(
        ("How have you been since we last saw you?",
         "Tell me more about {symptom}. When did it start?",
         "Are you still taking {regimen}?",
         "Any side effects from the {med}?",
         "Does it get worse with activity or at rest?",
         "Your blood pressure today is {bp} and your heart rate is {hr}.",
         "I would like to order a {test} before we change anything.",
         "Let's increase the {med} a little and see you again in {weeks} weeks.",
         "Have you noticed any pain in your {body}?",
         "On a scale of one to ten, how bad is it at its worst?",
         "Do you have any family history of {condition}?",
         "I listened to your heart and lungs and they sound clear today.",
         "We talked about your {condition} last time; how is the diet going?",
         "Are you sleeping well, and how is your mood?",
         "I'll send the prescription to your pharmacy today.",
         "Can you point to where it hurts the most?",
         "Has anything changed at home or at work since the last visit?",
         "Your last {test} was a little high, so we should repeat it.",
         "Let me press here on your {body}; tell me if it hurts.",
         "We could try {regimen} instead if this one bothers you.",
         "How many times a week do you exercise now?",
         "Any fever, night sweats or weight loss?",
         "I'd like you to keep a log of your blood pressure at home for {weeks} weeks.",
         "The {test} from the spring was normal, which is reassuring.",
         "Let's check your feet today as well, since you have {condition}.",
         "Are you taking anything over the counter, like ibuprofen or supplements?"),
        ("I've had {symptom} for {duration}.",
         "It's mostly in my {body}, and it gets worse in the evening.",
         "Yes, I take {regimen}, but sometimes I forget.",
         "The {med} upset my stomach for the first few days.",
         "My mother had {condition}, and my brother too.",
         "It's about a six most days, maybe an eight at night.",
         "I tried ibuprofen and it helped a little.",
         "I've been walking more, but work has been stressful.",
         "I'm not sleeping great, maybe five hours a night.",
         "No chest pain, but I get winded on the stairs.",
         "I had a {test} done last year and they said it was fine.",
         "Should I keep taking the {med}?",
         "I don't smoke, and I drink maybe twice a week.",
         "It all started after I lifted some boxes at work.",
         "Some days it's fine and some days I can barely get up.",
         "I stopped the {med} for a few days because of {symptom}.",
         "I checked my pressure at the pharmacy and it was {bp}.",
         "My {body} has been stiff in the mornings for {duration}.",
         "I'd rather not take more pills if we can avoid it.",
         "I was in the hospital for {condition} two years ago.",
         "My daughter thinks I should see a specialist.",
         "I've cut down on salt like you said."),
    ),
    prefixes=("Doctor: ", "Patient: "),
    separator="\n",
    closing=("Doctor: Any other questions before we finish today?", ""),
    doc_title=("Guideline: management of {condition} in adults in primary care",
               "Practice protocol: follow-up and monitoring of {condition}"),
    doc_lines=(
        "Confirm the diagnosis of {condition} with repeat measurements before starting treatment.",
        "Offer {med} as first-line therapy unless it is contraindicated or not tolerated.",
        "Start at {dose} {freq} and review the response after {weeks} weeks.",
        "Check kidney function with a {test} before starting and after any dose change.",
        "Target a clinic blood pressure below 130/80 for most adults with {condition}.",
        "Assess cardiovascular risk at diagnosis and at least once a year.",
        "Do not combine two agents acting on the same pathway without specialist advice.",
        "Refer urgently if the patient reports {symptom} with red-flag features.",
        "Document shared decisions, the options discussed and the patient's preference.",
        "Review adherence and side effects at every visit before escalating treatment.",
    ),
    answer_lines=(
        "Subjective: the patient reports {symptom} for {duration}.",
        "Objective: blood pressure {bp}, heart rate {hr}, lungs clear.",
        "Assessment: {condition}, currently not at target.",
        "Plan: continue {regimen} and order a {test}.",
        "Follow up in {weeks} weeks or sooner if symptoms worsen.",
        "The patient agreed with the plan and had no further questions.",
        "No medication allergies were documented in this visit.",
    ),
    synonyms=_GENERIC_SYNONYMS + (("transcript", "recording"), ("visit", "appointment"),
                                  ("patient", "person seen")),
)

SUPPORT = Domain(
    name="support",
    system=("You are the customer support assistant of an online store. Be friendly and brief, follow the "
            "store's policies, and ask for the order number when you need it."),
    content_label="Customer message",
    instructions={
        "small": (
            "Classify this customer message as shipping, refund, account, billing or other. Reply with the label.",
            "Extract the order number and the product from this message.",
            "Is this message a complaint? Answer yes or no.",
            "Detect the language of this customer message.",
        ),
        "medium": (
            "Answer this customer question using our refund and shipping policy.",
            "Draft a polite reply to this customer complaint.",
            "Write a friendly answer to this customer that explains the next steps.",
            "Reply to this customer in a few sentences and apologize for the delay.",
        ),
        "large": (
            "Investigate this customer case step by step: reason about which policy applies to each item, "
            "calculate the refund owed including shipping and the discount, and explain the derivation in detail.",
            "Analyze this escalated complaint in depth, reconstruct the timeline, identify the root cause of "
            "the failure, and recommend a resolution with a detailed justification.",
        ),
    },
    followups={
        "small": ("What's the order number again?", "Is that refund to my card?", "Ok, thanks.",
                  "Can you confirm my email address?", "Which courier is it?"),
        "medium": ("How long will the refund take?", "Can I change the delivery address instead?",
                   "What if the replacement is also damaged?", "Can you explain the return steps again?",
                   "Is there a cheaper plan I could switch to?"),
        "large": ("I was charged twice and used a promo code; can you work out exactly what I should get back?",
                  "Compare cancelling now with waiting until renewal and tell me which costs less overall."),
    },
    header=("Hi,", "Hello,", "Hi there,", "Good morning,", ""),
    lead=("I ordered the {product} on {date} and it still hasn't arrived.",
          "My order {order} says delivered but I never received the package.",
          "I want to return the {product}, it stopped working after a week.",
          "I was charged twice for my {plan} this month.",
          "I can't log in to my account, the password reset email never comes.",
          "The {product} arrived damaged, the box was crushed.",
          "How do I cancel my {plan} before it renews?",
          "The promo code didn't apply at checkout and I paid {amount}.",
          "I need to change the shipping address on order {order}.",
          "Where is my refund for order {order}? It has been two weeks.",
          "Can I exchange the {product} for a different color?",
          "The tracking number doesn't work on the courier's website."),
    lines=(
        ("The order number is {order}.", "I paid {amount} with my credit card.",
         "I already tried restarting it.", "This is the second time this has happened.",
         "I need it before the weekend.", "I have attached a photo of the box.",
         "My account email is the one I'm writing from.", "I bought it on {date}.",
         "It was supposed to be a gift.", "The courier said it was left at the door.",
         "I checked with my neighbours and nobody has it.", "I've been a customer for years.",
         "Your chat bot sent me in circles.", "I'd prefer a refund rather than store credit.",
         "The app shows an error when I open my orders.", "I used the same card as always.",
         "Nobody answered my email from last week.", "I live in an apartment with a front desk.",
         "The item is still in its original packaging.", "I can send the receipt if you need it."),
    ),
    prefixes=("", ""),
    closing=("Thanks.", "Thank you!", "Please help.", "Can you check?", ""),
    doc_title=("Help center: returns and refunds", "Help center: shipping times and tracking",
               "Help center: managing your {plan}", "Policy: damaged or missing items"),
    doc_lines=(
        "Items can be returned within 30 days of delivery in their original packaging.",
        "Refunds are issued to the original payment method within 5 to 10 business days.",
        "Standard shipping takes 3 to 5 business days; express shipping takes 1 to 2.",
        "If a package shows as delivered but is missing, wait 48 hours and then contact us.",
        "Damaged items are replaced free of charge when reported within 14 days with a photo.",
        "A subscription can be cancelled at any time and stays active until the end of the period.",
        "Duplicate charges are refunded automatically within 3 business days.",
        "Promo codes cannot be applied after an order has been placed.",
        "Return shipping is free for damaged or faulty items and costs $5.99 otherwise.",
        "Exchanges for another size or color are processed as a return and a new order.",
        "Orders can be changed or cancelled until they are packed, usually within 2 hours.",
        "A password reset link expires after 30 minutes; check the spam folder first.",
        "Store credit never expires and can be combined with one promo code.",
        "Gift orders can be returned by the recipient with the gift receipt.",
        "Refunds for subscriptions are prorated when cancelled within the first 14 days.",
        "The courier makes three delivery attempts before returning a package to us.",
    ),
    answer_lines=(
        "I'm sorry about the trouble with your order.",
        "I've checked order {order} and it is with the courier now.",
        "I've started a refund of {amount} to your original payment method.",
        "You should see it within 5 to 10 business days.",
        "I've sent a new password reset link to your email.",
        "A replacement {product} will ship today at no cost.",
        "Is there anything else I can help you with?",
    ),
    synonyms=_GENERIC_SYNONYMS + (
        ("ordered", "purchased"), ("hasn't arrived", "has not been delivered"), ("package", "parcel"),
        ("I want to", "I would like to"), ("stopped working", "broke"), ("charged twice", "billed twice"),
        ("can't", "cannot"), ("How do I", "How can I"), ("arrived damaged", "came damaged"),
        ("Where is", "What happened to"), ("It has been", "It's been"), ("Can I", "Is it possible to"),
        ("doesn't work", "is not working"), ("never comes", "never arrives"), ("Thanks.", "Thank you."),
        ("Hi,", "Hello,"), ("customer", "client"), ("reply", "response"),
    ),
    paraphrase_content=True,
)

BACKOFFICE = Domain(
    name="backoffice",
    system=("You process business documents for the finance and operations teams. Answer exactly in the "
            "requested format, with no commentary."),
    content_label="Document",
    instructions={
        "small": (
            "Classify this document as invoice, purchase order, contract, complaint or other. Answer with the label only.",
            "Extract the invoice number, the vendor name and the total amount as JSON.",
            "Extract the due date and the payment terms from this document.",
            "Which department should handle this document? Answer with one word.",
            "Return only the purchase order number in this document.",
        ),
        "medium": (
            "Summarize this document in three sentences for the approver.",
            "Write a short email to the vendor asking for the missing details in this document.",
            "Turn this document into a list of action items with owners.",
        ),
        "large": (
            "Reconcile every line of this invoice against the purchase order step by step: recompute each line "
            "total and the tax, identify every discrepancy, and explain the derivation of the amount to pay.",
            "Analyze this contract clause by clause, reason about the financial risk of each term, estimate the "
            "worst-case exposure with explicit assumptions, and recommend changes with justification.",
        ),
    },
    followups={
        "small": ("Return the vendor name only.", "What is the total?", "Extract the PO number."),
        "medium": ("Summarize the discrepancy in one paragraph.",),
        "large": ("Recalculate the totals assuming a 5 percent early-payment discount and explain each step.",),
    },
    header=("From: {vendor} billing. Subject: invoice {inv} for {po}.",
            "{vendor} - Invoice {inv} - Purchase order {po} - {dept}",
            "Purchase order {po} issued by {dept} to {vendor}",
            "Service agreement between {vendor} and our {dept} department"),
    lead=(),
    lines=(
        ("Line: {qty} x {item} at {price} each.",
         "Payment terms: net {days} days from the invoice date.",
         "Please remit payment to the account on file by the due date.",
         "Delivery was completed on {date} at the main warehouse.",
         "A late fee of 1.5 percent per month applies to overdue balances.",
         "The agreed unit price for {item} is {price}.",
         "Tax is charged at 8 percent on goods and not on services.",
         "The contract renews automatically for twelve months unless cancelled {days} days in advance.",
         "Either party may terminate for material breach with {days} days written notice.",
         "Questions about this invoice should go to the {dept} team.",
         "Total due: {amount}.",
         "The supplier's liability is limited to the fees paid in the previous twelve months."),
    ),
    prefixes=("",),
    closing=("Regards, {vendor} billing team", ""),
    separator="\n",
    doc_title=("Policy: accounts payable approval thresholds", "Policy: vendor onboarding and payment terms"),
    doc_lines=(
        "Invoices above $10,000 need a second approver from the {dept} department.",
        "An invoice must match its purchase order within 2 percent before it is paid.",
        "Standard payment terms are net 30 days unless the contract says otherwise.",
        "Early-payment discounts are taken whenever the cash position allows it.",
        "Contracts with automatic renewal must be flagged to procurement 60 days in advance.",
    ),
    answer_lines=(
        '{{"invoice": "{inv}", "vendor": "{vendor}", "total": "{amount}"}}',
        "invoice", "purchase order", "{dept}", "The line totals match the purchase order.",
        "The freight charge is not on the purchase order.",
    ),
    synonyms=_GENERIC_SYNONYMS + (("document", "file"), ("invoice", "bill"), ("vendor", "supplier")),
)

GENERIC = Domain(
    name="generic",
    system="You are a helpful assistant.",
    content_label="Text",
    instructions={
        "small": ("Extract the numbers from this text.", "Classify the sentiment of this text as positive, negative or neutral.",
                  "Detect the language of this text.", "Turn this text into a JSON list of its main terms."),
        "medium": ("Summarize this text in a few sentences.", "Rewrite this text in a friendlier tone.",
                   "Explain this text to a beginner in simple terms."),
        "large": ("Analyze the argument in this text step by step, find every flaw in its reasoning, and write a "
                  "rigorous long-form critique with justification.",
                  "Build a quantitative model from this text with explicit assumptions and derive the result."),
    },
    followups={"small": ("Return only the first number.",), "medium": ("Make it shorter.",),
               "large": ("Now reason about the strongest counter-argument in detail.",)},
    header=("Notes on {topic}:", "Report on {topic} for {dept}:"),
    lead=(),
    lines=(("The {dept} team reviewed {topic} this quarter.", "Costs rose by about 12 percent over the period.",
            "Several teams reported delays of {days} days.", "The main driver appears to be supplier lead times.",
            "A pilot started on {date} with {qty} participants.", "Results so far are mixed but encouraging."),),
    prefixes=("",),
    closing=("",),
    doc_title=("Background: {topic}",),
    doc_lines=("Past reviews of {topic} found seasonal effects.", "Benchmarks vary widely between industries."),
    answer_lines=("Here is a short summary.", "The text describes {topic}.", "The main numbers are 12 and {qty}."),
    synonyms=_GENERIC_SYNONYMS,
)

DOMAINS: dict[str, Domain] = {d.name: d for d in (CLINICAL, SUPPORT, BACKOFFICE, GENERIC)}
