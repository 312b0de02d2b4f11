#!/bin/sh
# `server ARGS`: weed server with its data in /data (the volume), as the upstream image runs it.
set -e
case "$1" in
    server) shift; exec /usr/bin/weed -logtostderr=true server -dir=/data "$@" ;;
    *) exec /usr/bin/weed "$@" ;;
esac
