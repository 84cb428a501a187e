"""Files in and out of a job: fetch.py fetches inputs, delivery.py delivers the video, s3.py and volume.py are
the places both use."""
