"""Running a recipe as a scheduled job: an sbatch script for Slurm, a task file for SkyPilot.

Both are written into the run folder and run the run's own resolved recipe, so the job trains exactly
what was submitted even if the recipe file changes afterwards.
"""
