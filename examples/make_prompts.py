"""Regenerate examples/prompts.jsonl: 256 short, varied chat prompts for the benchmarks.

Deterministic (no randomness beyond a fixed seed): run `python examples/make_prompts.py` from the
repository root and the file comes out byte-identical. Each row is
{"id": "ex-000", "prompt": "...", "category": "..."}; prompts are 8-40 words, which with the
SmolLM2 chat template (and its default system prompt) is roughly 20-60 prompt tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("prompts.jsonl")

QUESTION_TOPICS = [
    "photosynthesis", "inflation", "black holes", "the immune system", "compound interest",
    "plate tectonics", "the water cycle", "vaccines", "blockchain", "the greenhouse effect",
    "supply and demand", "the Doppler effect", "machine learning", "the French Revolution",
    "DNA replication", "ocean tides", "antibiotic resistance", "the stock market",
    "quantum entanglement", "jet lag", "the Silk Road", "sleep cycles", "electric cars",
    "the placebo effect", "volcanoes", "credit scores", "the Roman Empire", "rainbows",
]
QUESTION_TEMPLATES = [
    "Can you explain {t} in simple terms?",
    "What is {t} and why does it matter?",
    "Explain {t} to a ten-year-old in a few sentences.",
    "I keep hearing about {t}. What is it, briefly?",
    "What are the most common misconceptions about {t}?",
    "Give me three key facts about {t} that most people do not know.",
    "How would you describe {t} to someone with no science background?",
]

HOWTO_TASKS = [
    "make a good cup of pour-over coffee", "prepare for a job interview",
    "start running as a beginner", "keep houseplants alive in a dark apartment",
    "save money on groceries", "learn a new language faster", "write a strong cover letter",
    "organize a small kitchen", "fall asleep faster at night", "change a flat bicycle tire",
    "negotiate a higher salary", "plan a weekend trip on a budget", "reduce screen time",
    "clean a cast iron pan", "give constructive feedback to a coworker",
    "prepare a simple vegetable stir fry", "back up photos from my phone", "study for a math exam",
    "train a puppy to sit", "make a monthly budget", "improve my handwriting",
    "speak confidently in meetings", "set up a home compost bin", "write clear emails",
    "stay focused while working from home", "choose a good laptop for college",
    "care for a sourdough starter", "pack light for a week of travel",
]
HOWTO_TEMPLATES = [
    "Give me step-by-step instructions to {t}.",
    "What is the best way to {t}? Keep it short.",
    "List five practical tips to {t}.",
    "I am a complete beginner. How do I {t}?",
    "Write a short checklist that helps me {t}.",
]

SUMMARIZE_TEXTS = [
    "The city council voted to expand the bike lane network by forty kilometers over the next "
    "three years, citing rising cycling numbers and fewer traffic injuries.",
    "Researchers found that people who walked at least seven thousand steps a day had a lower "
    "risk of heart disease, even after accounting for age and diet.",
    "The company reported record quarterly revenue, driven by strong cloud sales, but warned that "
    "rising energy costs and slower hiring could weigh on profits next year.",
    "After months of drought, heavy rains finally reached the region, filling reservoirs but also "
    "causing flooding in several low-lying villages where roads were washed away.",
    "The museum's new exhibit brings together paintings, letters and photographs that show how the "
    "artist's style changed after she moved from the countryside to the capital.",
    "A new study suggests that twenty-minute naps can improve alertness and memory, while longer "
    "naps may leave people feeling groggy.",
    "The library will extend its opening hours during exam season and add quiet study rooms, "
    "free printing for students and a weekend tutoring program run by volunteers.",
    "Engineers replaced the old bridge with a lighter steel design that can carry more traffic, "
    "finishing two months early despite a long and unusually cold winter.",
    "Local farmers are switching to drought-resistant crops such as millet and sorghum as summers "
    "become hotter and water for irrigation becomes more expensive.",
    "The software update fixes a battery drain problem, adds a dark mode and makes the app start "
    "twice as fast on older phones.",
]
SUMMARIZE_TEMPLATES = [
    "Summarize in one sentence: {t}",
    "Give me the main point of this text: {t}",
    "Write a short headline for this news item: {t}",
]

TRANSLATE_SENTENCES = [
    "Where is the nearest train station?", "I would like a table for two, please.",
    "The meeting has been moved to Thursday afternoon.",
    "Thank you very much for your help yesterday.",
    "How much does this jacket cost?", "Could you speak a little more slowly?",
    "We are going to the beach this weekend.", "My flight was delayed by three hours.",
    "Please close the window, it is cold.", "The museum is closed on Mondays.",
    "I have been learning to play the guitar.", "What time does the pharmacy open tomorrow?",
    "Happy birthday, I hope you have a wonderful day.", "The soup is too salty for me.",
]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Japanese"]
TRANSLATE_TEMPLATES = [
    "Translate into {lang}: \"{t}\"",
    "How do you say \"{t}\" in {lang}?",
    "Please translate this sentence to {lang}: {t}",
]

REWRITE_TEXTS = [
    "hey can u send me the report asap its really late and the boss is mad",
    "The thing is that we kind of maybe need more time to finish the project I think.",
    "Our product is good. It is cheap. It is fast. People like it.",
    "I am writing to inform you that your request has been denied due to reasons.",
    "the party was super fun and everyone danced until like 3am lol",
    "Please be advised that the aforementioned meeting shall henceforth be postponed.",
    "We regret to say the shipment got lost somewhere, sorry about that.",
    "This restaurant was okay, the food was fine but the waiter was kind of rude.",
    "Due to the fact that it was raining, the game was cancelled by the officials.",
    "i think we should maybe try the new plan but im not sure if it will work",
    "The results of the experiment were not good and we do not know why.",
    "Thanks for the gift, it was nice.",
]
REWRITE_STYLES = [
    "more formal", "more polite", "shorter and clearer", "more friendly", "more persuasive",
    "sound like a pirate", "more professional",
]
REWRITE_TEMPLATES = [
    "Rewrite this to be {style}: \"{t}\"",
    "Make the following sentence {style}: {t}",
    "Fix the grammar and make it {style}: {t}",
]

CODING = [
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I reverse a list in Python without using the reverse method?",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that returns the ten most recent orders from an orders table.",
    "Explain what a closure is in JavaScript with a tiny example.",
    "How do I read a CSV file with pandas and print the first five rows?",
    "Write a bash one-liner that counts the lines in all .txt files in a folder.",
    "What does the yield keyword do in Python?",
    "Write a function in JavaScript that removes duplicate values from an array.",
    "How can I merge two dictionaries in Python?",
    "What is the time complexity of binary search, and why?",
    "Write a Python function that returns the nth Fibonacci number iteratively.",
    "Explain the difference between git merge and git rebase in a few sentences.",
    "How do I make an HTTP GET request in Python using the requests library?",
    "What is a race condition, and how can a mutex prevent it?",
    "Write a regular expression that matches a simple email address.",
    "How do I sort a list of dictionaries by a key in Python?",
    "What is the difference between an abstract class and an interface in Java?",
    "Write a C function that swaps two integers using pointers.",
    "Why is my Python loop slow, and when should I use NumPy instead?",
    "How do I create a virtual environment in Python and activate it?",
    "Explain what Big O notation means with two short examples.",
    "Write a Python list comprehension that squares the even numbers from 1 to 20.",
    "What does the HTTP status code 404 mean, and how is it different from 500?",
    "How do I handle exceptions in Python? Show a short try and except example.",
    "Write a Rust function that returns the largest number in a vector of integers.",
    "What is recursion? Give a simple example in Python.",
    "How do I convert a string to an integer in JavaScript safely?",
]

MATH = [
    "A shirt costs 25 dollars and is on sale for 20 percent off. What is the sale price?",
    "Tom has 12 apples. He gives 3 to Anna and half of the rest to Ben. How many apples does Tom "
    "have left?",
    "A train travels 180 kilometers in 2 hours. What is its average speed?",
    "If 5 pencils cost 2 dollars, how much do 15 pencils cost?",
    "A rectangle is 8 meters long and 5 meters wide. What is its area and perimeter?",
    "Sara reads 30 pages a day. How many days does she need to finish a 450 page book?",
    "What is 15 percent of 240? Show your work.",
    "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 36 cookies?",
    "Solve for x: 3x + 7 = 22.",
    "A car uses 6 liters of fuel per 100 kilometers. How much fuel does it need for 350 "
    "kilometers?",
    "The sum of two numbers is 50 and their difference is 10. What are the numbers?",
    "If a pizza is cut into 8 slices and you eat 3, what fraction of the pizza is left?",
    "A bank account pays 5 percent interest per year. How much is 1000 dollars worth after two "
    "years with compounding?",
    "Maria is twice as old as her brother. In 5 years their ages will add up to 40. How old is "
    "Maria now?",
    "A store sells notebooks at 3 for 4 dollars. How much do 12 notebooks cost?",
    "What is the average of 12, 18, 25 and 45?",
    "A tank holds 200 liters and fills at 8 liters per minute. How long does it take to fill from "
    "empty?",
    "Three workers build a wall in 6 days. How long would it take two workers at the same rate?",
    "What is the next number in the sequence 2, 6, 12, 20, 30?",
    "A circle has a radius of 7 centimeters. What is its approximate area?",
    "If a movie starts at 7:45 pm and lasts 2 hours and 35 minutes, when does it end?",
    "A class has 28 students and 4 out of every 7 are girls. How many boys are there?",
    "Convert 72 degrees Fahrenheit to Celsius and explain the formula.",
    "John saves 15 dollars a week. How many weeks until he can buy a 240 dollar bike?",
    "What is the probability of rolling a sum of 7 with two fair dice?",
    "A runner finishes 10 kilometers in 50 minutes. What is her pace per kilometer?",
    "Simplify the fraction 84 over 126 and explain each step.",
    "A phone plan costs 20 dollars a month plus 5 cents per text. What is the bill for 300 texts?",
]

TRIVIA = [
    "What is the capital of Australia?", "Who wrote the novel Pride and Prejudice?",
    "What is the largest planet in our solar system?",
    "In which year did the first person walk on the Moon?",
    "What is the chemical symbol for gold?", "Which ocean is the largest on Earth?",
    "Who painted the Mona Lisa?", "What is the tallest mountain in Africa?",
    "How many bones are in the adult human body?", "What language has the most native speakers?",
    "Which country is home to the kangaroo?",
    "What is the boiling point of water at sea level in Celsius?",
    "Who developed the theory of general relativity?", "What is the smallest prime number?",
    "Which element do plants absorb from the air to make sugar?",
    "What is the longest river in South America?",
    "Who was the first woman to win a Nobel Prize?", "What is the hardest natural substance?",
    "What is the currency of Japan?", "How many continents are there, and what are they?",
    "Which planet is known as the Red Planet, and why?", "What instrument has 88 keys?",
    "Who is usually credited with inventing the telephone?",
    "What is the main gas in the Earth's atmosphere?",
    "In which city is the Colosseum located?", "What is the speed of light, approximately?",
    "Which animal is the largest mammal on Earth?",
    "What is the freezing point of water in Fahrenheit?",
]

CREATIVE = [
    "Write a haiku about the first snow of winter.",
    "Write a four-line poem about a cat who loves the sun.",
    "Tell me a very short story about a robot learning to paint.",
    "Write a limerick about a forgetful wizard.",
    "Describe a busy morning market in three vivid sentences.",
    "Write the opening line of a mystery novel set in a lighthouse.",
    "Invent a name and a slogan for a new eco-friendly coffee shop.",
    "Write a short, funny dialogue between a toaster and a refrigerator.",
    "Write a two-sentence horror story about an old elevator.",
    "Describe the ocean to someone who has never seen it, in a short paragraph.",
    "Write a motivational message for a friend starting a new job.",
    "Write a short bedtime story about a brave little turtle.",
    "Give me three creative ideas for a child's birthday party.",
    "Write a thank-you note to a teacher who helped me a lot this year.",
    "Write a product description for a backpack that never gets wet.",
    "Write a short poem about city lights at night.",
    "Invent a new holiday and describe how people celebrate it.",
    "Write a tweet announcing the opening of a small neighborhood bakery.",
    "Write a short fable about a fox and a crow with a clear moral.",
    "Describe a futuristic city in the year 2200 in three sentences.",
    "Write a short love letter from the Moon to the Earth.",
    "Write a riddle whose answer is a shadow.",
    "Write a short scene where two old friends meet at a train station.",
    "Come up with five names for a friendly dragon in a children's book.",
    "Write a cheerful good-morning message for a team chat.",
    "Write a short song chorus about summer road trips.",
    "Describe autumn in a forest using all five senses.",
    "Write a one-paragraph adventure about finding a hidden door in a library.",
]

ADVICE = [
    "My roommate never does the dishes. How can I bring it up without starting a fight?",
    "I have two job offers, one pays more and the other has better hours. How should I decide?",
    "What are some healthy snacks I can bring to work?",
    "I feel nervous before public speaking. Any quick tips?",
    "What should I consider before adopting a dog?",
    "How can I make new friends after moving to a new city?",
    "What are good habits for staying productive in the morning?",
    "I want to start investing but I know nothing. Where should I begin?",
    "How do I politely decline an invitation to a party?",
    "What are the pros and cons of working from home?",
    "Should I learn Python or JavaScript first as a beginner programmer?",
    "How can I make my small apartment feel more spacious?",
    "What are some ways to reduce stress during exam week?",
    "How much water should an adult drink each day?",
    "My laptop battery dies quickly. What can I do to make it last longer?",
    "What is a good way to remember people's names after meeting them?",
]


def build() -> list[dict]:
    rng = random.Random(20251125)
    rows: list[tuple[str, str]] = []
    for i, t in enumerate(QUESTION_TOPICS):
        rows.append(("question", QUESTION_TEMPLATES[i % len(QUESTION_TEMPLATES)].format(t=t)))
    for i, t in enumerate(HOWTO_TASKS):
        rows.append(("instruction", HOWTO_TEMPLATES[i % len(HOWTO_TEMPLATES)].format(t=t)))
    for i, t in enumerate(SUMMARIZE_TEXTS):
        for j in range(2):
            tpl = SUMMARIZE_TEMPLATES[(i + j) % len(SUMMARIZE_TEMPLATES)]
            rows.append(("summarize", tpl.format(t=t)))
    for i, t in enumerate(TRANSLATE_SENTENCES):
        for j in range(2):
            lang = LANGUAGES[(2 * i + j) % len(LANGUAGES)]
            tpl = TRANSLATE_TEMPLATES[(i + j) % len(TRANSLATE_TEMPLATES)]
            rows.append(("translate", tpl.format(t=t, lang=lang)))
    for i, t in enumerate(REWRITE_TEXTS):
        for j in range(2):
            style = REWRITE_STYLES[(2 * i + j) % len(REWRITE_STYLES)]
            tpl = REWRITE_TEMPLATES[(i + j) % len(REWRITE_TEMPLATES)]
            rows.append(("rewrite", tpl.format(t=t, style=style)))
    rows += [("coding", p) for p in CODING]
    rows += [("math", p) for p in MATH]
    rows += [("trivia", p) for p in TRIVIA]
    rows += [("creative", p) for p in CREATIVE]
    rows += [("advice", p) for p in ADVICE]
    assert len(rows) == 256, len(rows)
    rng.shuffle(rows)
    return [{"id": f"ex-{i:03d}", "prompt": p, "category": c} for i, (c, p) in enumerate(rows)]


def main() -> None:
    rows = build()
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
