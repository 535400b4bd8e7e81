"""Running a recipe as a scheduled job: an sbatch script for Slurm, a task file for SkyPilot.

Both are written into the run folder and run the run's own resolved recipe, so the job trains exactly
what was submitted even if the recipe file changes afterwards.
"""


def job_gpus(recipe) -> int:
    """GPUs a job asks for: launch.gpus, and at least one per training process when it asks for any."""
    gpus = recipe.launch.gpus
    return max(gpus, recipe.train.processes) if gpus else 0
