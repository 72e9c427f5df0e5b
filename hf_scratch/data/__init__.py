"""Offline dataset builders that write `datasets`-loadable image folders."""
