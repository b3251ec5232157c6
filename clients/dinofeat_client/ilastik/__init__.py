"""ilastik feature provider: feature files ilastik reads with the right axes, a ready-to-open
Pixel Classification project, and the headless batch command (see docs in README, "ilastik")."""
