//! OpenAI request and response understanding (helper fills this in).
