"""Methods as declarations, without torch: each one's parameters, paper preset and setup checks.

``cvad.methods.<name>`` declares the method that ``cvad.models.<name>`` implements (the model class
subclasses the declaration); ``cvad.catalog`` names both. Config validation reads only these.
"""
