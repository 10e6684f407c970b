"""(being written)"""

commands: list = []
