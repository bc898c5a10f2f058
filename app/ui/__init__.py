"""The web dashboard at `/ui`: static HTML, JS modules and CSS shipped in the package.

The pages talk to the `/v1` API from the browser with the user's key (session storage); the
server only hands out files, each with a strict Content-Security-Policy."""
