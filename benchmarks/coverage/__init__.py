"""Coverage sweeps over model zoos: conversion, cost model against fvcore, export."""
