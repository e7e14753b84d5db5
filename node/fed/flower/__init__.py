"""Flower's deployment engine for federations that outgrow the P2P path: process supervision and the Flower app."""
