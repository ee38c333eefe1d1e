"""The shipped policies, installed as package data so that `-p NAME` works anywhere."""
