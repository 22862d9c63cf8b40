"""The shared tokenizing machinery, below the stages: preference data read, normalised,
tokenised, validated and packed into rows. The tokenize stage runs it, and the sft stage
on data of its own."""
