"""The layers: which parameters form each (:mod:`.partition`), their order by the first forward
(:mod:`.trace`), the optimizer's record of them (:mod:`.book`), which of them a step updates
(:mod:`.sampling`, :mod:`.smoothness`) and how the others are frozen while a forward runs
(:mod:`.truncation`)."""
