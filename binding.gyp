{
  "targets": [
    {
      "target_name": "ballast_native",
      "sources": ["native/ballast_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE"]
    }
  ]
}
