"""OpenAI's API shapes for vbatch: request bodies, response bodies and errors (see
`vbatch.openai.protocol`), shared by `vbatch serve` and OpenAI batch files."""
