# The pg-heartbeat CLI (`pg-heartbeat migrate | demo | merge | ...`), built from
# this checkout, for docker-compose.yml. Build context: the repository root.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY sql ./sql
COPY migrations ./migrations
# npm ci runs the `prepare` script, which compiles src/ to dist/
RUN npm ci --no-audit --no-fund && test -f dist/src/cli/main.js

FROM node:20-bookworm-slim
WORKDIR /app
ENV NODE_ENV=production
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force
COPY --from=build /app/dist ./dist
# prom-client (an optional peer dependency, a dev dependency here) for `merger --metrics-port`: copied
# from the build stage with its dependencies (test/compose.test.ts checks the list is complete)
COPY --from=build /app/node_modules/prom-client ./node_modules/prom-client
COPY --from=build /app/node_modules/tdigest ./node_modules/tdigest
COPY --from=build /app/node_modules/bintrees ./node_modules/bintrees
COPY --from=build /app/node_modules/@opentelemetry/api ./node_modules/@opentelemetry/api
COPY sql ./sql
COPY migrations ./migrations
USER node
ENTRYPOINT ["node", "dist/src/cli/main.js"]
CMD ["--help"]
