"""The lifecycle: the combined approach as a running loop, on the gateway's own traffic.

    logged calls + feedback ──► distill (teacher labels) ──► fine-tune ──► shadow / canary ──► promote
                                                                                  ▲                │
                                              monitor: drift and health alarms ◄──┴────────────────┘

Modules: `calls` (the call log, shadow answers and feedback: the rows the gateway writes),
`rollouts` (a deployment's canary, shadow and promoted candidate), `evidence` (agreement, per-arm
metrics and the shadow comparison, with intervals), `promote` (gates, promotions and rollbacks,
recorded with their evidence), `distill` (logged inputs labelled by a teacher into a dataset, a
fine-tuned student, student vs teacher), `drift` (inputs, outputs and confidence of a window
against the evaluation split; alarms that say what to do). The gateway (`tunelab.server`) serves
rollouts; the CLI and the console call these modules.
"""
