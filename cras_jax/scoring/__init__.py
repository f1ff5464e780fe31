"""Scoring: the one Scorer every command scores through (`scoring`), the evaluation of a test
split (`evaluate`), thresholds (`thresholds`), and predicting new images (`predicting`,
`predict_inputs`)."""
