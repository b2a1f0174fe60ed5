#!/usr/bin/env bash
# Entrypoint of the adrec job image, following Spark's Kubernetes container contract.
#
#   driver ARGS...  a driver pod created by spark-submit in cluster mode (the Spark Operator's
#                   ScheduledSparkApplication): run spark-submit in client mode inside it
#   executor        an executor pod created by a driver: start the executor backend from the
#                   SPARK_* variables the driver sets on the pod
#   anything else   run as given (the CronJob's spark-submit, the stream job's
#                   `adrec stream run` in local mode, `adrec ...`, a shell)
#
# Everything runs under tini, so signals reach the JVM and forked Python workers are reaped.
set -euo pipefail

: "${SPARK_HOME:?SPARK_HOME must point at the Spark installation}"

classpath() {
  local cp="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}"
  if [[ -n "${HADOOP_CONF_DIR:-}" ]]; then
    cp="${cp}:${HADOOP_CONF_DIR}"
  fi
  cp="${cp}:${SPARK_HOME}/jars/*"
  if [[ -n "${SPARK_EXTRA_CLASSPATH:-}" ]]; then
    cp="${cp}:${SPARK_EXTRA_CLASSPATH}"
  fi
  if [[ -n "${SPARK_DIST_CLASSPATH:-}" ]]; then
    cp="${cp}:${SPARK_DIST_CLASSPATH}"
  fi
  # Files the driver ships to executors land in the working directory.
  printf '%s:%s' "${cp}" "${PWD}"
}

# The job's log configuration, copied next to its main.py: spark-submit starts the driver's
# JVM before the job runs, and without it Spark's default profile prints a screen of INFO
# lines ahead of the job's own output. SPARK_SUBMIT_OPTS reaches the JVM of every
# spark-submit, and a --driver-java-options of the caller's still comes after it and wins.
export SPARK_SUBMIT_OPTS="-Dlog4j2.configurationFile=file:/opt/adrec/jobs/log4j2.properties${SPARK_SUBMIT_OPTS:+ ${SPARK_SUBMIT_OPTS}}"

mode="${1:-}"
case "${mode}" in
  driver)
    shift
    exec tini -s -- "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:?}" \
      --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS}" \
      --deploy-mode client \
      "$@"
    ;;
  executor)
    shift
    # JVM options the driver passes as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ...
    java_opts=()
    while IFS= read -r name; do
      java_opts+=("${!name}")
    done < <(compgen -e | grep '^SPARK_JAVA_OPT_[0-9]*$' | sort -t_ -k4,4n || true)
    exec tini -s -- "${JAVA_HOME}/bin/java" \
      "${java_opts[@]}" \
      "-Xms${SPARK_EXECUTOR_MEMORY:?}" "-Xmx${SPARK_EXECUTOR_MEMORY}" \
      -cp "$(classpath)" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL:?}" \
      --executor-id "${SPARK_EXECUTOR_ID:?}" \
      --cores "${SPARK_EXECUTOR_CORES:?}" \
      --app-id "${SPARK_APPLICATION_ID:?}" \
      --hostname "${SPARK_EXECUTOR_POD_IP:?}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
      --podName "${SPARK_EXECUTOR_POD_NAME:-}"
    ;;
  "")
    echo "usage: entrypoint.sh driver ARGS... | executor | COMMAND [ARGS...]" >&2
    exit 64
    ;;
  *)
    exec tini -s -- "$@"
    ;;
esac
