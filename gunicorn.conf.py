"""Read by gunicorn from the working directory: warm each worker's serving model at boot.

Only hooks live here; the seed's command line (`-w 4 --worker-class eventlet`) stays the
place for workers, binding and worker class.
"""


def post_worker_init(worker):
    from app import start_serving

    start_serving(worker.wsgi)
